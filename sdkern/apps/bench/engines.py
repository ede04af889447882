"""Bench engines: how a pipeline is prepared for one engine and undone afterwards.

An engine prepares a pipeline in place (``setup``), runs it through ``run`` and restores it (``teardown``),
so that every engine of one bench run sees the same weights. ``available`` says why an engine cannot run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

#: Pipelines ``sdkern bench --pipeline`` runs (txt2img, img2img and inpainting call the U-Net the same way;
#: ControlNet adds the ControlNet's residuals to the U-Net call).
PIPELINES = ("txt2img", "img2img", "inpaint", "controlnet")

logger = logging.getLogger("sdkern")


@dataclass
class Engine:
    """One way of running the pipeline.

    Attributes
    ----------
    name : str
        Engine name shown in the table.
    provider : str
        Backend description (the ``provider`` column).
    opt_in : bool
        Not part of the default engine list.
    """

    name: str
    provider: str
    opt_in: bool = False
    _state: dict[str, Any] = field(default_factory=dict, repr=False)
    #: pipelines this engine runs, and why it does not run the others
    pipelines: ClassVar[tuple[str, ...]] = PIPELINES
    unsupported_why: ClassVar[str] = ""

    def supports(self, pipeline: str) -> str | None:
        """``None`` when the engine runs ``pipeline`` (one of :data:`PIPELINES`), else the reason it does not."""
        if pipeline in self.pipelines:
            return None
        return f"{self.name} does not run {pipeline} pipelines ({self.unsupported_why})"

    def available(self, pipe: Any, device: torch.device) -> str | None:
        """``None`` when the engine can run, else the reason it cannot."""
        return None

    def version(self) -> str:
        """Version string of what the engine runs (the ``version`` column)."""
        import diffusers

        return f"diffusers {diffusers.__version__}"

    def setup(self, pipe: Any) -> None:
        """Prepare ``pipe`` in place."""

    def run(self, pipe: Any, call: Callable[[Any], Any]) -> Any:
        """Run one pipeline call."""
        return call(pipe)

    def teardown(self, pipe: Any) -> None:
        """Undo :meth:`setup`."""


class EagerEngine(Engine):
    """diffusers as built, attention through PyTorch SDPA."""

    def __init__(self) -> None:
        super().__init__("eager", "torch SDPA")

    def version(self) -> str:
        import diffusers

        return f"torch {torch.__version__.split('+')[0]} / diffusers {diffusers.__version__}"


def _patch_api() -> tuple[Callable[..., Any], Callable[..., Any] | None] | str:
    """``(patch, unpatch)`` from :mod:`sdkern.patch`, or the reason it is unavailable."""
    try:
        import sdkern

        patch = sdkern.patch
    except Exception as e:  # noqa: BLE001 - any failure means the engine is skipped with its reason
        return f"sdkern.patch unavailable ({type(e).__name__}: {e})"
    try:
        unpatch = sdkern.unpatch
    except Exception:  # noqa: BLE001
        unpatch = None
    return patch, unpatch


class SdkernEngine(Engine):
    """The pipeline rewritten by ``sdkern.patch(pipe)`` (fused kernels)."""

    def __init__(self, graphs: bool = False) -> None:
        super().__init__("sdkern-graphs" if graphs else "sdkern", "sdkern + CUDA graphs" if graphs else "sdkern")
        self.graphs = graphs

    def version(self) -> str:
        import sdkern

        return f"sdkern {sdkern.__version__}"

    def available(self, pipe: Any, device: torch.device) -> str | None:
        api = _patch_api()
        if isinstance(api, str):
            return api
        if self.graphs:
            if device.type != "cuda":
                return "CUDA graphs need a CUDA device"
            try:
                from sdkern.runtime import graphs  # noqa: F401
            except Exception as e:  # noqa: BLE001
                return f"sdkern.runtime graphs unavailable ({type(e).__name__}: {e})"
        return None

    def setup(self, pipe: Any) -> None:
        api = _patch_api()
        assert not isinstance(api, str), api
        patch, unpatch = api
        if unpatch is None:
            # No undo available: keep the original modules to restore them afterwards.
            self._state["saved"] = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder") if hasattr(pipe, k)}
            for k, m in self._state["saved"].items():
                setattr(pipe, k, copy.deepcopy(m))
        self._state["unpatch"] = unpatch
        if self.graphs:
            patch(pipe, cuda_graphs=True)  # U-Net, VAE decode and text encoder as CUDA graphs
        else:
            patch(pipe)

    def teardown(self, pipe: Any) -> None:
        unpatch = self._state.pop("unpatch", None)
        if unpatch is not None:
            unpatch(pipe)
        for k, m in self._state.pop("saved", {}).items():
            setattr(pipe, k, m)


class CompileEngine(Engine):
    """``torch.compile`` of the U-Net with inductor's ``freezing`` (opt-in: compilation takes minutes)."""

    def __init__(self, mode: str | None = None) -> None:
        super().__init__("compile", "torch.compile (inductor, freezing)", opt_in=True)
        self.mode = mode

    def version(self) -> str:
        return f"torch {torch.__version__.split('+')[0]} inductor"

    def setup(self, pipe: Any) -> None:
        import torch._inductor.config as inductor_config

        self._state["unet"] = pipe.unet
        # freezing: weights become constants that inductor prepacks (on CPU: oneDNN / MKL packed GEMMs)
        self._state["freezing"] = inductor_config.freezing
        inductor_config.freezing = True
        pipe.unet = torch.compile(pipe.unet, mode=self.mode, fullgraph=False)

    def teardown(self, pipe: Any) -> None:
        import torch._inductor.config as inductor_config

        if "unet" in self._state:
            pipe.unet = self._state.pop("unet")
        if "freezing" in self._state:
            inductor_config.freezing = self._state.pop("freezing")
        torch._dynamo.reset()


class OrtEngine(Engine):
    """The U-Net on ONNX Runtime (:class:`sdkern.onnx.OrtUNet`); the rest of the pipeline stays diffusers'.

    Two flavours:

    - ``ort-sdkern`` (``sdkern_ops=True``): exported, fused by ORT's optimiser and moved to sdkern's
      custom-op domain (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd), on the CPU execution
      provider with sdkern's ORT library;
    - ``ort`` (``sdkern_ops=False``): ONNX Runtime's own optimisation only, no sdkern library. On CUDA:
      ORT's Stable Diffusion fusions (com.microsoft GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd,
      NhwcConv, attention) on the CUDA EP. On CPU: only the fusions the CPU EP has kernels for
      (SkipLayerNormalization, LayerNormalization, Attention / MultiHeadAttention, Gelu); GroupNorm,
      SkipGroupNorm, BiasSplitGelu, BiasAdd and NhwcConv have no CPU kernel in onnxruntime (checked with
      1.32, see :data:`sdkern.apps.onnx.build.CPU_EP_MISSING`) and stay unfused.

    Each setup exports and optimises, in a child process, into a temporary directory that teardown removes:
    nothing is cached across bench runs. On CPU the torch U-Net's weights are parked on disk meanwhile
    (:class:`sdkern.apps.bench.park.ParkedWeights`: their checkpoint is the child's input, and teardown puts them
    back bit-exactly), so neither the export child's peak nor the ORT session stacks on a resident copy.
    No ControlNet: the exported U-Net has no inputs for the ControlNet's residuals.
    """

    pipelines = ("txt2img", "img2img", "inpaint")
    unsupported_why = "the exported U-Net has no inputs for the ControlNet's residuals"

    def __init__(self, sdkern_ops: bool) -> None:
        if sdkern_ops:
            super().__init__("ort-sdkern", "onnxruntime CPU EP + sdkern ops", opt_in=True)
        else:
            super().__init__("ort", "onnxruntime (ORT fusions)", opt_in=True)
        self.sdkern_ops = sdkern_ops

    def version(self) -> str:
        try:
            import onnxruntime

            return f"onnxruntime {onnxruntime.__version__}"
        except ImportError:
            return "onnxruntime (missing)"

    def available(self, pipe: Any, device: torch.device) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return f"onnxruntime is not installed ({e})"
        try:
            from sdkern.apps import onnx as sk_onnx  # noqa: F401 - needs the onnx package
        except Exception as e:  # noqa: BLE001
            return f"sdkern.onnx unavailable ({type(e).__name__}: {e})"
        dtype = getattr(pipe.unet, "dtype", torch.float32)
        if dtype not in (torch.float32, torch.float16):
            return f"the ONNX path exports float32 or float16 U-Nets, not {dtype}"
        if self.sdkern_ops:
            if device.type != "cpu":
                return "ort-sdkern runs the U-Net on ONNX Runtime's CPU execution provider only (use ort on CUDA)"
            try:
                from sdkern import ort as sk_ort

                sk_ort.library_path()
            except Exception as e:  # noqa: BLE001
                return f"sdkern ORT library unavailable ({e})"
            return None
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return (
                    f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                    f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
                )
            return None
        return f"ort runs on the CPU or CUDA execution provider, not on {device.type}"

    def setup(self, pipe: Any) -> None:
        import tempfile
        from pathlib import Path

        from sdkern.apps.bench.park import ParkedWeights
        from sdkern.apps.onnx import OrtUNet
        from sdkern.runtime import release_free_memory

        target = "cuda" if pipe.unet.device.type == "cuda" else "cpu"
        self._state["unet"] = unet = pipe.unet
        checkpoint = None
        if target == "cpu":
            # the torch U-Net is not called while ORT runs it: its weights wait on disk (3.4 GB for SD1.5 fp32), and
            # their checkpoint is what the export child reads
            tmp = tempfile.TemporaryDirectory(prefix="sdkern-bench-unet-")
            self._state["tmp"] = tmp
            self._state["parked"] = parked = ParkedWeights(unet, Path(tmp.name) / "unet")
            checkpoint = parked.path
            release_free_memory()  # the freed weights back to the system (the bench's tuned malloc keeps them)
        try:
            # export + optimise in a child process: their peak memory (several times the U-Net's) is returned to
            # the system before the session opens instead of stacking on the pipeline's
            pipe.unet = OrtUNet.from_module(
                unet, target=target, sdkern_ops=self.sdkern_ops, isolate=True, checkpoint=checkpoint
            )
        except BaseException:
            self.teardown(pipe)  # the runner tears down only what set up
            raise

    def teardown(self, pipe: Any) -> None:
        if "unet" in self._state:
            ort_unet = pipe.unet
            pipe.unet = self._state.pop("unet")
            if ort_unet is not pipe.unet and hasattr(ort_unet, "close"):
                ort_unet.close()
        parked, tmp = self._state.pop("parked", None), self._state.pop("tmp", None)
        try:
            if parked is not None:
                parked.restore()
        finally:
            if tmp is not None:
                tmp.cleanup()


class OvUNet:
    """The U-Net on OpenVINO's CPU plugin, with the ``UNet2DConditionModel`` call interface pipelines use.

    Compiled for static shapes on the first call of each input signature (OpenVINO's fastest mode on
    CPU, as ``benchmarks/cpu_peers.py`` runs it), ``INFERENCE_PRECISION_HINT`` bf16 for a bf16 U-Net and
    f32 otherwise. The model is always converted from float32 (a bf16 / fp16 U-Net is traced after a lossless
    round trip of its weights to float32: OpenVINO's precision hint, not the traced dtype, picks bf16), takes
    float32 inputs and gives the output back in the pipeline's dtype. SD 1.x / 2.x U-Nets (sample, timestep,
    encoder_hidden_states) only.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.config = unet.config
        self.dtype = unet.dtype
        self.device = unet.device
        self._compiled: dict[tuple[Any, ...], Any] = {}

    def _request(self, sample: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> Any:
        key = (tuple(sample.shape), tuple(ctx.shape))
        if key not in self._compiled:
            import openvino as ov

            unet = self.unet

            class _Wrap(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.unet = unet

                def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                    return self.unet(a, b, encoder_hidden_states=c, return_dict=False)[0]

            dtype = unet.dtype
            try:
                with torch.no_grad():
                    unet.float()  # the trace's inputs are float32; bf16/fp16 -> fp32 -> back is exact
                    model = ov.convert_model(
                        _Wrap(), example_input=(sample, t, ctx), input=[sample.shape, t.shape, ctx.shape]
                    )
            finally:
                unet.to(dtype)
            hint = "bf16" if self.dtype == torch.bfloat16 else "f32"
            compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
            self._compiled[key] = compiled.create_infer_request()
        return self._compiled[key]

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        unsupported = [k for k, v in kwargs.items() if v is not None and k != "cross_attention_kwargs"]
        if args or unsupported:
            raise NotImplementedError(f"the openvino engine runs SD 1.x/2.x U-Nets only (got {unsupported})")
        t = torch.tensor(float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep))
        x = sample.detach().float().contiguous()
        ctx = encoder_hidden_states.detach().float().contiguous()
        req = self._request(x, t, ctx)
        req.infer([x.numpy(), t.numpy(), ctx.numpy()])
        out = torch.from_numpy(req.get_output_tensor(0).data.copy()).to(sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class OpenVinoEngine(Engine):
    """The U-Net on OpenVINO's CPU plugin (opt-in; conversion and compilation take tens of seconds)."""

    pipelines = ("txt2img", "img2img", "inpaint")
    unsupported_why = "the converted U-Net has no inputs for the ControlNet's residuals"

    def __init__(self) -> None:
        super().__init__("openvino", "OpenVINO CPU plugin", opt_in=True)

    def version(self) -> str:
        try:
            import openvino

            return f"openvino {openvino.__version__.split('-')[0]}"
        except ImportError:
            return "openvino (missing)"

    def available(self, pipe: Any, device: torch.device) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return f"openvino is not installed ({e}); pip install openvino"
        if device.type != "cpu":
            return "the openvino engine runs on the CPU"
        if getattr(pipe.unet.config, "addition_embed_type", None) is not None:
            return "the openvino engine runs SD 1.x/2.x U-Nets (no SDXL added conditioning)"
        return None

    def setup(self, pipe: Any) -> None:
        self._state["unet"] = pipe.unet
        pipe.unet = OvUNet(pipe.unet)

    def teardown(self, pipe: Any) -> None:
        if "unet" in self._state:
            pipe.unet = self._state.pop("unet")


def all_engines() -> dict[str, Engine]:
    """Every engine by name (eager first: it is the reference of the diff column)."""
    engines: list[Engine] = [EagerEngine(), SdkernEngine(), SdkernEngine(graphs=True), CompileEngine()]
    engines += [OrtEngine(sdkern_ops=False), OrtEngine(sdkern_ops=True), OpenVinoEngine()]
    return {e.name: e for e in engines}


def default_engine_names(device: torch.device) -> list[str]:
    """Engines that apply to ``device`` without opting in."""
    names = ["eager", "sdkern"]
    if device.type == "cuda":
        names.append("sdkern-graphs")
    return names
