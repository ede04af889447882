"""A U-Net stand-in that runs on ONNX Runtime.

Used by ``sdkern bench --engines ort,ort-sdkern``: the pipeline stays diffusers', only ``pipe.unet`` is
replaced. Inputs and the output are bound to torch tensors by pointer (``session.io_binding()``), so on
the CUDA execution provider nothing leaves the GPU between steps; the same code runs on the CPU EP.
"""

from __future__ import annotations

import logging
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("sdkern")

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class OrtUNet:
    """Callable with the ``UNet2DConditionModel`` interface diffusers' SD and SDXL pipelines use.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session of an exported (and optimised) U-Net with inputs sample, timestep,
        encoder_hidden_states (SDXL: also text_embeds and time_ids, fed from ``added_cond_kwargs``; the U-Net
        of a ControlNet pipeline: also ``down_block_additional_residual_{i}`` and
        ``mid_block_additional_residual``, zeros when the call passes none) and output out_sample.
    unet : UNet2DConditionModel
        The source module (or any object with its ``config``, ``dtype`` and ``device``): mirrored.
    io_binding : bool
        Bind torch tensors by pointer (default). False feeds NumPy copies through ``session.run``
        (CPU tensors only; kept to check the binding path against).
    """

    def __init__(self, session: Any, unet: torch.nn.Module, io_binding: bool = True) -> None:
        self.session = session
        self.config = unet.config
        self.dtype = unet.dtype
        self.device = unet.device
        self.io_binding = io_binding
        types_ = {i.name: i.type for i in session.get_inputs()}
        self._dtype = {n: _ORT_TYPES.get(t, torch.float32) for n, t in types_.items()}
        self._out_name = session.get_outputs()[0].name
        self._out_dtype = _ORT_TYPES.get(session.get_outputs()[0].type, torch.float32)
        self._workdir: Any = None
        #: inputs fed from ``added_cond_kwargs`` (SDXL's text_time conditioning)
        self._added = [n for n in ("text_embeds", "time_ids") if n in types_]
        #: ControlNet residual inputs (down blocks in order, then mid) with (channels, downsampling factor)
        self._residuals = _residual_inputs(session)
        if self._added:
            # StableDiffusionXLPipeline._get_add_time_ids checks the embedding width against this
            width = int(self.config.projection_class_embeddings_input_dim)
            self.add_embedding = types.SimpleNamespace(linear_1=types.SimpleNamespace(in_features=width))

    @classmethod
    def from_module(
        cls,
        unet: torch.nn.Module,
        target: str = "cpu",
        workdir: str | None = None,
        *,
        sdkern_ops: bool = True,
        io_binding: bool = True,
        isolate: bool = False,
        checkpoint: str | Path | None = None,
    ) -> OrtUNet:
        """Export ``unet``, optimise it for ``target`` and open a session.

        Parameters
        ----------
        unet : UNet2DConditionModel
            The module, float32 or float16 (exported from a float32 CPU copy, then converted to fp16).
        target : {"cpu", "cuda"}
            ``"cpu"``: CPU execution provider; ``"cuda"``: ORT's CUDA fusions on the CUDA EP.
        workdir : str, optional
            Where the ONNX files go. Default: a temporary directory removed by :meth:`close`.
        sdkern_ops : bool
            CPU only: fuse into sdkern's custom ops (True) or keep to what ORT's CPU EP implements.
        io_binding : bool
            See the class.
        isolate : bool
            Export and optimise in a child process (the U-Net goes to it as a safetensors checkpoint in
            ``workdir``), so the exporter's and the ONNX optimiser's peak memory is returned to the system
            before the session opens, instead of stacking on this process's (``sdkern bench`` does this:
            the SD1.5 U-Net's export next to a loaded pipeline otherwise exceeds 24 GB).
        checkpoint : str or Path, optional
            With ``isolate``: a ``save_pretrained`` directory of ``unet`` (any dtype) for the child to export
            from, instead of writing one (``sdkern bench`` passes the checkpoint it parked the U-Net's weights
            in, :class:`sdkern.apps.bench.park.ParkedWeights`; ``unet`` itself is then only read for its
            dtype and device).

        Returns
        -------
        OrtUNet
        """
        import onnxruntime as ort

        if target not in ("cpu", "cuda"):
            raise ValueError(f"OrtUNet target must be 'cpu' or 'cuda', got {target!r}")
        tmp = None
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="sdkern-ort-unet-")
            workdir = tmp.name
        root = Path(workdir)
        fp16 = unet.dtype == torch.float16
        opt = root / "opt" / "model.onnx"
        from sdkern.apps.onnx.export_unet import export_in_child, export_optimize, float32_cpu

        if isolate:
            ckpt = None if checkpoint is None else Path(checkpoint)
            counts = export_in_child(unet, root, target, fp16, sdkern_ops, checkpoint=ckpt)
        elif checkpoint is not None:
            raise ValueError("OrtUNet.from_module: checkpoint= is read by the export child: pass isolate=True")
        else:
            counts = export_optimize(float32_cpu(unet), root, target, fp16, sdkern_ops)
        logger.info("sdkern OrtUNet: %s%s, sdkern ops %s: %s", target, " fp16" if fp16 else "", sdkern_ops, counts)
        so = ort.SessionOptions()
        if target == "cpu" and sdkern_ops:
            from sdkern.ort import session_options

            so = session_options(so)
        if target == "cpu":
            providers: list[Any] = ["CPUExecutionProvider"]
        else:
            index = unet.device.index if unet.device.type == "cuda" and unet.device.index is not None else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        session = ort.InferenceSession(str(opt), so, providers=providers)
        ort_unet = cls(session, unet, io_binding=io_binding)
        ort_unet._workdir = tmp
        return ort_unet

    def close(self) -> None:
        """Drop the session and remove the temporary directory :meth:`from_module` made (if any)."""
        self.session = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def _run_bound(self, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Run with every tensor bound by pointer; ``feeds`` and ``out`` must stay alive until it returns."""
        binding = self.session.io_binding()
        for name, t in feeds.items():
            dev = t.device
            binding.bind_input(
                name,
                dev.type,
                dev.index or 0,
                _NP_DTYPES[t.dtype],
                list(t.shape),
                t.data_ptr(),
            )
        binding.bind_output(
            self._out_name,
            out.device.type,
            out.device.index or 0,
            _NP_DTYPES[out.dtype],
            list(out.shape),
            out.data_ptr(),
        )
        if out.device.type == "cuda":
            # ORT runs on its own stream: the inputs written on torch's stream must be complete first.
            # session.run_with_iobinding synchronises ORT's stream before it returns.
            torch.cuda.current_stream(out.device).synchronize()
        self.session.run_with_iobinding(binding)

    def _residual_feeds(self, sample: torch.Tensor, down: Any, mid: Any) -> dict[str, torch.Tensor]:
        """The ControlNet residual inputs: those given, or zeros (a U-Net with residual inputs run without a
        ControlNet: x + 0 = x, the plain U-Net). A NotImplementedError when given to a U-Net without them."""
        if (down is None) != (mid is None):
            raise ValueError("OrtUNet: pass both down_block_additional_residuals and mid_block_additional_residual")
        if not self._residuals:
            if down is not None:
                raise NotImplementedError(
                    "OrtUNet: this U-Net was exported without ControlNet residual inputs (optimise the ControlNet "
                    "pipeline to get one that has them)"
                )
            return {}
        if down is None:
            b, h, w = sample.shape[0], sample.shape[2], sample.shape[3]
            return {
                name: torch.zeros(b, c, -(-h // f), -(-w // f), dtype=sample.dtype, device=sample.device)
                for name, (c, f) in self._residuals.items()
            }
        given = [*down, mid]
        if len(given) != len(self._residuals):
            raise ValueError(
                f"OrtUNet: {len(given) - 1} down-block residuals given, {len(self._residuals) - 1} expected"
            )
        return dict(zip(self._residuals, given, strict=True))

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

        added = kwargs.pop("added_cond_kwargs", None) or {}
        residuals = self._residual_feeds(
            sample,
            kwargs.pop("down_block_additional_residuals", None),
            kwargs.pop("mid_block_additional_residual", None),
        )
        unsupported = [k for k, v in kwargs.items() if v is not None and k not in ("cross_attention_kwargs",)]
        unsupported += [f"added_cond_kwargs[{k!r}]" for k in added if k not in self._added]
        if args or unsupported:
            accepted = ", ".join(["sample", "timestep", "encoder_hidden_states", *self._added])
            raise NotImplementedError(f"OrtUNet supports {accepted} only (got {unsupported})")
        missing = [k for k in self._added if added.get(k) is None]
        if missing:
            raise ValueError(f"OrtUNet: this U-Net needs added_cond_kwargs {missing} (SDXL's text_time conditioning)")
        if self.session is None:
            raise RuntimeError("OrtUNet: the session was closed")
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        dev = sample.device
        if self.io_binding:
            # contiguous copies in the model's dtypes, on the sample's device, held until the run returns
            feeds = {
                "sample": sample.detach().to(self._dtype["sample"]).contiguous(),
                "timestep": torch.tensor([t], dtype=self._dtype["timestep"], device=dev),
                "encoder_hidden_states": encoder_hidden_states.detach()
                .to(dev, self._dtype["encoder_hidden_states"])
                .contiguous(),
                **{k: added[k].detach().to(dev, self._dtype[k]).contiguous() for k in self._added},
                **{k: r.detach().to(dev, self._dtype[k]).contiguous() for k, r in residuals.items()},
            }
            shape = (sample.shape[0], self.config.out_channels, *sample.shape[2:])
            out = torch.empty(shape, dtype=self._out_dtype, device=dev)
            self._run_bound(feeds, out)
            out = out.to(sample.dtype)
        else:
            np_feeds = {
                "sample": sample.detach().cpu().to(self._dtype["sample"]).numpy(),
                "timestep": np.array([t], dtype=_NP_DTYPES[self._dtype["timestep"]]),
                "encoder_hidden_states": encoder_hidden_states.detach()
                .cpu()
                .to(self._dtype["encoder_hidden_states"])
                .numpy(),
                **{k: added[k].detach().cpu().to(self._dtype[k]).numpy() for k in self._added},
                **{k: r.detach().cpu().to(self._dtype[k]).numpy() for k, r in residuals.items()},
            }
            out = torch.from_numpy(self.session.run(None, np_feeds)[0]).to(dev, sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def _residual_inputs(session: Any) -> dict[str, tuple[int, int]]:
    """``{name: (channels, downsampling factor)}`` of a U-Net session's ControlNet residual inputs, in the
    order the U-Net takes them (down blocks, then mid); the factor is read from the dynamic axis name
    ``height/<f>`` that :mod:`sdkern.apps.onnx.export` gives them."""
    found: dict[int, tuple[str, tuple[int, int]]] = {}
    for i in session.get_inputs():
        if i.name.startswith("down_block_additional_residual_"):
            key = int(i.name.rsplit("_", 1)[1])
        elif i.name == "mid_block_additional_residual":
            key = 1 << 30
        else:
            continue
        found[key] = (i.name, (int(i.shape[1]), int(str(i.shape[2]).split("/")[1])))
    return dict(v for _, v in sorted(found.items()))
