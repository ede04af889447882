"""diffusers' torch pipelines with ORT-backed networks: :func:`load_sdxl` (SDXL always), :func:`load_sd` (SD 1.x/2.x
for device-resident runs and tasks beyond txt2img), and what they share (:data:`TASKS`, the directory's parts).

diffusers has no ONNX SDXL pipeline (its ``OnnxStableDiffusionPipeline`` covers SD 1.x / 2.x only), and
optimum's ``ORTStableDiffusionXLPipeline`` is not a dependency here. Rather than re-implementing SDXL's
prompt encoding, added time ids, guidance and latent handling in NumPy, :func:`load_sdxl` builds the
torch ``StableDiffusionXLPipeline`` itself and gives it stand-ins for its four networks, in the way
:class:`sdkern.onnx.OrtUNet` already stands in for the U-Net:

- :class:`OrtTextEncoder` (``text_encoder`` and ``text_encoder_2``): returns the output object
  ``encode_prompt`` reads (``[0]`` is the pooled / projected embedding for the second encoder,
  ``hidden_states[-2]`` the penultimate hidden state);
- :class:`sdkern.onnx.OrtUNet` with SDXL's ``text_embeds`` / ``time_ids`` inputs;
- :class:`OrtVae` (``vae``): ``decode`` runs ``vae_decoder/model.onnx``, ``encode`` (img2img, inpainting)
  ``vae_encoder/model.onnx``'s ``latent_parameters``, sampled in torch with the pipeline's generator;
- with a ``controlnet`` folder :class:`sdkern.apps.onnx.standins.OrtControlNet`, with a ``safety_checker``
  folder :class:`sdkern.apps.onnx.standins.OrtSafetyChecker` (SD only: diffusers' SDXL pipelines have none).

:data:`TASKS` maps ``task`` (txt2img, img2img, inpaint, controlnet) to the diffusers pipeline class built.

Every tensor the pipeline handles stays a torch CPU tensor, so its scheduler, generators, latents and
callbacks behave exactly as on the torch path (same seed, same start latents, same step noise); only the
networks run on ONNX Runtime. The stand-ins are ``torch.nn.Module`` subclasses without parameters, with
``dtype``, ``device`` and ``config`` mirroring the exported modules (read from each component's
``config.json``), because the pipeline reads those attributes.

The same stand-ins serve SD 1.x/2.x directories (:func:`load_sd`, a ``StableDiffusionPipeline``) when the
tensors must stay on the device between steps (the CUDA execution provider): the stand-ins then report
that device, the pipeline keeps latents, embeddings and scheduler state there, and :class:`OrtUNet`
binds the U-Net's inputs and output by pointer (IO binding). Text encoders and the VAE decoder run once
per image and go through NumPy. With ``device="cpu"`` and ``io_binding=True`` the same path runs on the
CPU provider (that is how it is tested here: no GPU).

Not supported (each refused with one clear error): ``clip_skip`` (only the penultimate hidden state is
exported), ``vae.encode`` on directories written before ``latent_parameters`` was exported, and fp16 VAE
upcasting.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from sdkern.apps.onnx.standins import ORT_TO_TORCH, OrtTextEncoder, OrtVae, _Mirror

logger = logging.getLogger("sdkern")

SDXL_COMPONENT_DIRS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
#: diffusers pipeline class per task: (SD 1.x/2.x, SDXL)
TASKS = {
    "txt2img": ("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    "img2img": ("StableDiffusionImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
    "inpaint": ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"),
    "controlnet": ("StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline"),
}


def default_task(path: str | os.PathLike[str]) -> str:
    """The task a directory is for, from ``model_index.json``: controlnet, inpaint (a 9-channel U-Net) or
    txt2img."""
    index = Path(path) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if "ControlNet" in name:
        return "controlnet"
    return "inpaint" if "Inpaint" in name else "txt2img"


def is_sdxl_dir(path: str | os.PathLike[str]) -> bool:
    """Whether the pipeline directory ``path`` holds an SDXL pipeline (a ``text_encoder_2`` entry)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    return "text_encoder_2" in json.loads(index.read_text())


def _config(path: Path) -> Any:
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(json.loads(path.read_text())) if path.is_file() else FrozenDict()


class _Parts:
    """What both stand-in pipelines are assembled from: sessions on one provider, the U-Net and VAE
    stand-ins, text encoders, tokenizers and the scheduler of the directory ``root``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        provider: str,
        sess_options: Any,
        device: Any,
        io_binding: bool,
        kwargs: dict,
    ) -> None:
        from sdkern.apps.onnx.unet import OrtUNet

        provider_options = kwargs.pop("provider_options", None) or {}
        if kwargs:
            raise TypeError(f"unsupported arguments for a stand-in ONNX pipeline: {sorted(kwargs)}")
        self.root, self.device = Path(path), torch.device(device)
        self.providers: list[Any] = [(provider, provider_options)]
        if provider != "CPUExecutionProvider":
            self.providers.append("CPUExecutionProvider")
        self.sess_options = sess_options
        self.index = json.loads((self.root / "model_index.json").read_text())

        unet_session = self.session("unet")
        mirror = _Mirror(self.config("unet"), self.device)
        mirror.dtype = ORT_TO_TORCH.get(unet_session.get_inputs()[0].type, torch.float32)
        # io_binding=False: NumPy feeds (works on every provider, tensors go through host memory)
        self.unet = OrtUNet(unet_session, mirror, io_binding=io_binding)
        vae_session = self.session("vae_decoder")
        vae_cfg = self.config("vae_decoder")
        if ORT_TO_TORCH.get(vae_session.get_inputs()[0].type) == torch.float16 and vae_cfg.get("force_upcast"):
            # the ONNX decoder's dtype was fixed by ``sdkern optimize``: the pipeline cannot upcast it
            logger.info("sdkern onnx: %s: fp16 VAE decoder, force_upcast does not apply", self.root)
            from diffusers.configuration_utils import FrozenDict

            vae_cfg = FrozenDict({**vae_cfg, "force_upcast": False})
        encoder = self.session("vae_encoder") if (self.root / "vae_encoder" / "model.onnx").is_file() else None
        self.vae = OrtVae(vae_session, vae_cfg, self.device, encoder=encoder)

    def controlnet(self) -> Any:
        """The ControlNet stand-in, or None when the directory has none."""
        from sdkern.apps.onnx.standins import OrtControlNet

        if not (self.root / "controlnet" / "model.onnx").is_file():
            return None
        return OrtControlNet(self.session("controlnet"), self.config("controlnet"), self.device)

    def safety_checker(self) -> tuple[Any, Any]:
        """(safety checker stand-in, its image processor), or (None, None) when the directory has none."""
        from sdkern.apps.onnx.standins import OrtSafetyChecker

        if not (self.root / "safety_checker" / "model.onnx").is_file():
            return None, None
        import transformers

        # CLIPImageProcessorPil (newer transformers) needs no torchvision; CLIPImageProcessor otherwise
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        fe = cls.from_pretrained(str(self.root / "feature_extractor"))
        return OrtSafetyChecker(self.session("safety_checker"), self.device), fe

    def pipeline_class(self, task: str, sdxl: bool) -> Any:
        """The diffusers pipeline class of ``task`` (:data:`TASKS`); a ValueError for an unknown task or a
        ControlNet task on a directory without a ControlNet."""
        import diffusers

        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task == "controlnet" and not (self.root / "controlnet" / "model.onnx").is_file():
            raise ValueError(
                f"{self.root}: task 'controlnet' needs a controlnet/ folder (optimise a ControlNet pipeline)"
            )
        return getattr(diffusers, TASKS[task][1 if sdxl else 0])

    def session(self, comp: str) -> Any:
        import onnxruntime as ort

        return ort.InferenceSession(str(self.root / comp / "model.onnx"), self.sess_options, providers=self.providers)

    def config(self, comp: str) -> Any:
        return _config(self.root / comp / "config.json")

    def text_encoder(self, comp: str) -> OrtTextEncoder:
        return OrtTextEncoder(self.session(comp), self.config(comp), self.device)

    def tokenizer(self, comp: str) -> Any:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(self.root / comp))

    def scheduler(self) -> Any:
        import diffusers

        return getattr(diffusers, self.index["scheduler"][1]).from_pretrained(str(self.root / "scheduler"))


def load_sdxl(
    path: str | os.PathLike[str],
    provider: str,
    sess_options: Any,
    device: torch.device | str = "cpu",
    io_binding: bool = False,
    task: str | None = None,
    **kwargs: Any,
) -> Any:
    """An SDXL pipeline whose networks run on ONNX Runtime (see the module docstring).

    Parameters
    ----------
    path : directory
        An SDXL directory written by ``sdkern optimize``.
    provider : str
        Full ONNX Runtime execution provider name.
    sess_options : onnxruntime.SessionOptions
        With sdkern's custom-op library registered.
    device : torch.device or str
        Where the pipeline keeps its tensors (``"cuda"`` with the CUDA execution provider).
    io_binding : bool
        Bind the U-Net's inputs and output by pointer (:class:`sdkern.onnx.OrtUNet`).
    task : {"txt2img", "img2img", "inpaint", "controlnet"}, optional
        The pipeline built (:data:`TASKS`); default :func:`default_task` of the directory.
    **kwargs
        ``provider_options`` (one dict, for ``provider``) is used; anything else is refused.

    Returns
    -------
    diffusers.StableDiffusionXLPipeline (or its Img2Img, Inpaint, ControlNet variant)
        Progress bar disabled, no watermarker.
    """
    parts = _Parts(path, provider, sess_options, device, io_binding, kwargs)
    task = task or default_task(path)
    cls = parts.pipeline_class(task, sdxl=True)
    extra = {"controlnet": parts.controlnet()} if task == "controlnet" else {}
    pipe = cls(
        **extra,
        vae=parts.vae,
        text_encoder=parts.text_encoder("text_encoder"),
        text_encoder_2=parts.text_encoder("text_encoder_2"),
        tokenizer=parts.tokenizer("tokenizer"),
        tokenizer_2=parts.tokenizer("tokenizer_2"),
        unet=parts.unet,
        scheduler=parts.scheduler(),
        force_zeros_for_empty_prompt=bool(parts.index.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_sd(
    path: str | os.PathLike[str],
    provider: str,
    sess_options: Any,
    device: torch.device | str = "cpu",
    io_binding: bool = True,
    task: str | None = None,
    **kwargs: Any,
) -> Any:
    """An SD 1.x/2.x pipeline whose networks run on ONNX Runtime, tensors on ``device``.

    The device-resident alternative to diffusers' ``OnnxStableDiffusionPipeline`` (which moves every
    tensor through NumPy): see the module docstring.

    Parameters
    ----------
    path : directory
        An SD directory written by ``sdkern optimize`` (with full component ``config.json`` files).
    provider : str
        Full ONNX Runtime execution provider name.
    sess_options : onnxruntime.SessionOptions
        With sdkern's custom-op library registered.
    device : torch.device or str
        Where the pipeline keeps its tensors (``"cuda"`` with the CUDA execution provider).
    io_binding : bool
        Bind the U-Net's inputs and output by pointer (default).
    task : {"txt2img", "img2img", "inpaint", "controlnet"}, optional
        The pipeline built (:data:`TASKS`); default :func:`default_task` of the directory.
    **kwargs
        ``provider_options`` (one dict, for ``provider``) is used; anything else is refused.

    Returns
    -------
    diffusers.StableDiffusionPipeline (or its Img2Img, Inpaint, ControlNet variant)
        Progress bar disabled; the safety checker when the directory has one.

    Raises
    ------
    ValueError
        When the directory predates full component configs (re-run ``sdkern optimize``).
    """
    for comp, key in (("unet", "cross_attention_dim"), ("vae_decoder", "block_out_channels")):
        if key not in _config(Path(path) / comp / "config.json"):
            raise ValueError(
                f"{path}: {comp}/config.json lacks the full model config this path needs; "
                "re-run `sdkern optimize` to rewrite the directory"
            )
    parts = _Parts(path, provider, sess_options, device, io_binding, kwargs)
    task = task or default_task(path)
    cls = parts.pipeline_class(task, sdxl=False)
    extra = {"controlnet": parts.controlnet()} if task == "controlnet" else {}
    checker, feature_extractor = parts.safety_checker()
    pipe = cls(
        **extra,
        vae=parts.vae,
        text_encoder=parts.text_encoder("text_encoder"),
        tokenizer=parts.tokenizer("tokenizer"),
        unet=parts.unet,
        scheduler=parts.scheduler(),
        safety_checker=checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=checker is not None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
