"""Running an exported pipeline directory with ONNX Runtime and sdkern's custom-op library."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger("sdkern")

#: Short provider names accepted by :func:`resolve_provider` (and ``sdkern generate --provider``); they
#: are also the ``sdkern optimize --target`` names, each mapped to the provider its directory is meant for.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
}
COMPONENT_DIRS = ("text_encoder", "unet", "vae_decoder")


class OnnxPipelineError(ValueError):
    """An ONNX pipeline directory cannot be loaded: missing, not a pipeline, or no kernel on the provider."""


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``path`` is an ONNX pipeline directory and return its ``sdkern_manifest.json`` ({} if none).

    Parameters
    ----------
    path : directory
        Output of ``sdkern optimize`` or any diffusers ONNX Stable Diffusion directory.

    Returns
    -------
    dict
        The manifest written by ``sdkern optimize``, or an empty dict for a directory written by
        another tool.

    Raises
    ------
    OnnxPipelineError
        When ``path`` does not exist, is not a directory, or lacks ``model_index.json`` or one of
        ``text_encoder/``, ``unet/``, ``vae_decoder/`` (SDXL: also ``text_encoder_2/``; also
        ``controlnet/`` and ``safety_checker/`` when ``model_index.json`` names them) with its ``model.onnx``.
    """
    root = Path(path)
    if not root.exists():
        raise OnnxPipelineError(f"{root}: no such directory (write one with `sdkern optimize --out {root}`)")
    if not root.is_dir():
        raise OnnxPipelineError(f"{root}: not a directory")
    from sdkern.apps.onnx.diffusers_pipelines import SDXL_COMPONENT_DIRS, is_sdxl_dir

    dirs = SDXL_COMPONENT_DIRS if is_sdxl_dir(root) else COMPONENT_DIRS
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    # optional components the index names (controlnet, safety_checker) must be there too
    dirs += tuple(c for c in ("controlnet", "safety_checker") if (index.get(c) or [None])[0] is not None)
    missing = [n for n in ("model_index.json",) if not (root / n).is_file()]
    missing += [f"{c}/model.onnx" for c in dirs if not (root / c / "model.onnx").is_file()]
    if missing:
        raise OnnxPipelineError(
            f"{root}: not an ONNX pipeline directory (missing {', '.join(missing)}); "
            "write one with `sdkern optimize --out DIR`"
        )
    manifest_file = root / "sdkern_manifest.json"
    return json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}


def resolve_provider(provider: str | None, manifest: dict[str, Any] | None = None) -> str:
    """ONNX Runtime execution provider name for ``provider``.

    Parameters
    ----------
    provider : str or None
        ``"cpu"``, ``"cuda"``, ``"dml"`` or a full name such as ``"CUDAExecutionProvider"``. ``None``
        picks the provider of the directory's optimisation target (``manifest["options"]["target"]``),
        CPU when the directory has no manifest.
    manifest : dict, optional
        From :func:`read_manifest`.

    Returns
    -------
    str
        The full provider name.

    Raises
    ------
    OnnxPipelineError
        When the installed onnxruntime does not provide it.
    """
    import onnxruntime as ort

    if provider is None:
        target = ((manifest or {}).get("options") or {}).get("target", "cpu")
        name = PROVIDERS.get(target, "CPUExecutionProvider")
    else:
        name = PROVIDERS.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        hint = {
            "CUDAExecutionProvider": "install onnxruntime-gpu (and no other onnxruntime package)",
            "DmlExecutionProvider": "install onnxruntime-directml on Windows",
        }.get(name, "check the provider name")
        raise OnnxPipelineError(
            f"onnxruntime {ort.__version__} has no {name} (available: {', '.join(available)}); {hint}"
        )
    return name


def session_options(so: Any = None) -> Any:
    """``onnxruntime.SessionOptions`` with sdkern's custom-op library registered (once per object)."""
    import onnxruntime as ort

    from sdkern import ort as sdkern_ort

    if hasattr(sdkern_ort, "session_options"):
        return sdkern_ort.session_options(so)
    so = so if so is not None else ort.SessionOptions()
    if not getattr(so, "_sdkern_registered", False):
        so.register_custom_ops_library(str(sdkern_ort.library_path()))
    return so


class OrtStableDiffusionPipeline:
    """Factory for diffusers' ``OnnxStableDiffusionPipeline`` bound to sdkern's ORT library.

    ``from_pretrained(DIR, provider="CPUExecutionProvider")`` loads a directory written by
    ``sdkern optimize`` (or any diffusers ONNX pipeline directory) with SessionOptions that have
    the sdkern custom ops registered, so graphs using the ``sdkern`` domain run on the CPU EP.
    An SDXL directory (``text_encoder_2`` in ``model_index.json``) gives diffusers'
    ``StableDiffusionXLPipeline`` with ORT-backed networks instead (see :mod:`sdkern.apps.onnx.diffusers_pipelines`).

    ``task`` (``"img2img"``, ``"inpaint"``, ``"controlnet"``; default: what the directory is for, see
    :func:`.diffusers_pipelines.default_task`) gives diffusers' torch pipeline of that task with ORT stand-ins
    (the VAE encoder samples with the pipeline's generator; a ControlNet directory's ControlNet and
    U-Net with residual inputs; the safety checker when exported), so the same seed gives the torch
    path's images.

    On the CUDA execution provider (or with ``io_binding=True``) an SD directory loads instead as
    diffusers' ``StableDiffusionPipeline`` with ORT stand-ins (:func:`.diffusers_pipelines.load_sd`): latents,
    embeddings and scheduler state stay on the device between steps and the U-Net's inputs and output
    are bound by pointer (IO binding). diffusers' ONNX pipeline, used otherwise, moves every tensor
    through NumPy.
    """

    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str],
        provider: str | None = "CPUExecutionProvider",
        sess_options: Any = None,
        io_binding: bool | None = None,
        task: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load the pipeline.

        Parameters
        ----------
        path : directory
            Output of ``sdkern optimize``.
        provider : str or None
            ONNX Runtime execution provider ("CPUExecutionProvider", "CUDAExecutionProvider",
            "DmlExecutionProvider", or the short names of :data:`PROVIDERS`); ``None`` takes the
            provider of the directory's optimisation target.
        sess_options : onnxruntime.SessionOptions, optional
            Base options; the sdkern library is registered on them.
        io_binding : bool, optional
            Device-resident run with the U-Net bound by pointer (torch pipeline with ORT stand-ins).
            Default: on for the CUDA execution provider (tensors on ``cuda:<device_id>``), off otherwise.
            True with another provider keeps the tensors on the CPU.
        task : {"txt2img", "img2img", "inpaint", "controlnet"}, optional
            The pipeline to build (:data:`.diffusers_pipelines.TASKS`); default the directory's own
            (:func:`.diffusers_pipelines.default_task`). Every task but SD txt2img without IO binding gives a
            torch pipeline with ORT stand-ins.
        **kwargs
            Passed to ``diffusers.OnnxStableDiffusionPipeline.from_pretrained`` (stand-in pipelines take
            ``provider_options`` only).

        Returns
        -------
        diffusers.OnnxStableDiffusionPipeline, or a diffusers torch pipeline of the task
            The stand-in pipelines for an SDXL directory (:func:`.diffusers_pipelines.load_sdxl`), for tasks
            other than txt2img and for device-resident runs (:func:`.diffusers_pipelines.load_sd`).

        Raises
        ------
        OnnxPipelineError
            When ``path`` is missing or not a pipeline directory, the provider is not available, or
            a node of the model has no kernel on the provider (for example a directory optimised
            for ``--target cuda`` run on the CPU provider).
        """
        import diffusers

        from sdkern.apps.onnx.diffusers_pipelines import TASKS, default_task, is_sdxl_dir, load_sd, load_sdxl

        manifest = read_manifest(path)
        task = task or default_task(path)
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        provider = resolve_provider(provider, manifest)
        so = session_options(sess_options)
        # diffusers passes provider_options=[] with providers=[provider]; onnxruntime >= 1.2x rejects the
        # length mismatch ("EP Error") and retries on the CPU provider alone, which would silently drop
        # CUDA. One (empty) options dict per provider avoids that.
        kwargs.setdefault("provider_options", {})
        cuda = provider == "CUDAExecutionProvider"
        if io_binding is None:
            io_binding = cuda
        device = "cpu"
        if cuda and io_binding:
            options = kwargs["provider_options"]
            device = f"cuda:{int(options.get('device_id', 0)) if isinstance(options, dict) else 0}"
        try:
            if is_sdxl_dir(path):
                pipe = load_sdxl(path, provider, so, device=device, io_binding=io_binding, task=task, **kwargs)
            elif io_binding or task != "txt2img" or (Path(path) / "controlnet").is_dir():
                # diffusers' ONNX pipeline is SD txt2img only and feeds no ControlNet residuals
                pipe = load_sd(path, provider, so, device=device, io_binding=io_binding, task=task, **kwargs)
            else:
                pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(
                    str(path), provider=provider, sess_options=so, **kwargs
                )
        except Exception as e:
            missing = re.search(r"Could not find an implementation for (\S+) node with name '([^']*)'", str(e))
            if missing is None:
                raise
            target = (manifest.get("options") or {}).get("target", "unknown")
            fix = f"--provider {target}" if target in PROVIDERS else "a provider that implements it"
            raise OnnxPipelineError(
                f"{path}: {missing.group(1)} (node {missing.group(2)!r}) has no kernel on {provider}; the "
                f"directory was optimised for target {target!r}: run it with {fix}, or re-optimise it with "
                "`sdkern optimize --target` matching this provider"
            ) from e
        logger.info("sdkern onnx: loaded %s on %s", path, provider)
        return pipe


def pipeline_geometry(pipe: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Latent geometry of a loaded ONNX pipeline.

    Parameters
    ----------
    pipe : diffusers.OnnxStableDiffusionPipeline or StableDiffusionXLPipeline
        From :meth:`OrtStableDiffusionPipeline.from_pretrained`.
    path : directory
        The directory it was loaded from.

    Returns
    -------
    dict
        ``vae_scale_factor`` (pixels per latent, measured by decoding a 2x2 latent, so it is right
        for any VAE), ``sample_size`` (native latent side: ``unet/config.json`` written by
        ``sdkern optimize``, else 64 as in SD 1.x), ``latent_channels``, ``dtype`` (the NumPy
        dtype of the U-Net's ``sample`` input) and ``numpy_io`` (True: diffusers' ONNX pipeline, which
        takes NumPy latents sized as ``height // 8``; False: a torch pipeline with ORT stand-ins (SDXL,
        or SD run device-resident), which takes torch latents, generators and the real size).
    """
    import numpy as np

    root = Path(path)
    if not hasattr(pipe, "vae_decoder"):  # SDXL or device-resident SD: torch pipeline with ORT stand-ins
        sample_in = pipe.unet.session.get_inputs()[0]
        return {
            "vae_scale_factor": int(pipe.vae_scale_factor),
            "sample_size": int(pipe.unet.config.sample_size),
            # the latents' channels (an inpainting U-Net takes 9: latents, mask, masked-image latents)
            "latent_channels": int(pipe.vae.config.get("latent_channels", pipe.unet.config.in_channels)),
            "dtype": np.float16 if sample_in.type == "tensor(float16)" else np.float32,
            "numpy_io": False,
        }
    unet_cfg = root / "unet" / "config.json"
    cfg = json.loads(unet_cfg.read_text()) if unet_cfg.is_file() else {}
    sess = pipe.unet.model
    sample = next(i for i in sess.get_inputs() if i.name == "sample")
    dtype = np.float16 if sample.type == "tensor(float16)" else np.float32
    channels = int(cfg.get("in_channels") or (sample.shape[1] if isinstance(sample.shape[1], int) else 4))
    dec_in = pipe.vae_decoder.model.get_inputs()[0]
    dec_dtype = np.float16 if dec_in.type == "tensor(float16)" else np.float32
    dec_channels = dec_in.shape[1] if isinstance(dec_in.shape[1], int) else channels
    probe = pipe.vae_decoder(latent_sample=np.zeros((1, dec_channels, 2, 2), dtype=dec_dtype))[0]
    factor = int(probe.shape[-1]) // 2
    vae_cfg_file = root / "vae_decoder" / "config.json"
    vae_cfg = json.loads(vae_cfg_file.read_text()) if vae_cfg_file.is_file() else {}
    if abs(float(vae_cfg.get("scaling_factor", 0.18215)) - 0.18215) > 1e-6:
        logger.warning(
            "sdkern onnx: %s: VAE scaling factor %s, but diffusers' ONNX pipeline decodes with 0.18215: "
            "images will be off",
            root,
            vae_cfg["scaling_factor"],
        )
    if "sample_size" not in cfg:
        logger.info("sdkern onnx: %s has no unet/config.json: assuming native latent size 64", root)
    return {
        "vae_scale_factor": factor,
        "sample_size": int(cfg.get("sample_size", 64)),
        "latent_channels": channels,
        "dtype": dtype,
        "numpy_io": True,
    }
