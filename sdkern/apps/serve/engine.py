"""The model side of the server: load, patch and warm a pipeline once, then run batches of image jobs.

A job is one image: prompt, negative prompt, size, steps, guidance, scheduler and seed. Its initial
latents are drawn on CPU from ``torch.Generator("cpu").manual_seed(seed)`` and later scheduler noise
(ancestral / SDE steps) from the same generator, exactly as ``sdkern generate`` does, so an image depends
on its own job only, not on the batch it ran in.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdkern.apps.serve.schedulers import ONNX_SCHEDULERS, SCHEDULERS, make_scheduler

logger = logging.getLogger("sdkern")


@dataclass(frozen=True)
class ImageJob:
    """One image to generate.

    Attributes
    ----------
    prompt, negative_prompt : str
        Text conditions ("" = unconditional).
    width, height : int
        Image size in pixels (multiples of the VAE factor).
    steps : int
        Denoising steps.
    guidance : float
        Classifier-free guidance scale (<= 1: no guidance, half the U-Net batch).
    scheduler : str
        Canonical scheduler name (:data:`sdkern.apps.serve.schedulers.SCHEDULERS`).
    seed : int
        Seed of the CPU generator that draws the initial latents and later noise.
    """

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    seed: int


@dataclass
class EngineOptions:
    """How the server loads its model (``sdkern serve`` options)."""

    model: str = "tiny"
    engine: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    patch: bool = True
    deepcache: bool = False
    cuda_graphs: bool = False
    provider: str | None = None
    max_size: int | None = None


class Engine:
    """A loaded pipeline that runs batches of :class:`ImageJob`.

    Attributes
    ----------
    model_id : str
        Name reported by ``/v1/models`` and in PNG metadata.
    factor : int
        Pixels per latent (the VAE scale factor); sizes must be multiples of it.
    native_size : int
        The model's native image side (default size).
    max_size : int
        Largest accepted width or height.
    schedulers : tuple of str
        Scheduler names this engine runs.
    """

    def __init__(self, opts: EngineOptions) -> None:
        self.opts = opts
        self.pipe: Any = None
        self.geometry: dict[str, Any] | None = None
        self.patched = "no"
        self.kind = "sd"
        t0 = time.perf_counter()
        self._load()
        self.load_s = time.perf_counter() - t0
        self.max_size = opts.max_size or 2 * self.native_size

    # ---------------------------------------------------------------- loading
    def _load(self) -> None:
        from sdkern.apps import models
        from sdkern.apps.models.configs import PRESETS

        o = self.opts
        path = Path(o.model)
        onnx_dir = path.is_dir() and (path / "unet" / "model.onnx").is_file()
        if o.engine == "onnx" or onnx_dir:
            if o.model in PRESETS:
                raise ValueError(
                    f"--engine onnx needs a directory written by `sdkern optimize`, not the preset {o.model!r}"
                )
            self._load_onnx()
            return
        dtype = getattr(torch, o.dtype)
        if o.model in PRESETS:
            self.pipe = models.build(o.model, dtype=dtype, device=o.device)
            self.model_id = o.model
        else:
            self.pipe = models.load(o.model, dtype=dtype, device=o.device)
            self.model_id = path.name if path.is_dir() else o.model
        pipe = self.pipe
        self.kind = "sdxl" if hasattr(pipe, "text_encoder_2") else "sd"
        self.factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.native_size = int(pipe.unet.config.sample_size) * self.factor
        self.channels = int(pipe.unet.config.in_channels)
        self.base_scheduler_config = pipe.scheduler.config
        self.schedulers = tuple(SCHEDULERS)
        if o.patch:
            import sdkern

            try:
                sdkern.patch(pipe, cuda_graphs=o.cuda_graphs) if o.cuda_graphs else sdkern.patch(pipe)
                self.patched = "yes"
            except Exception as e:  # noqa: BLE001 - an unpatched pipeline still serves; say why
                logger.warning("sdkern serve: running unpatched: %s: %s", type(e).__name__, e)
                self.patched = f"no ({type(e).__name__}: {e})"
        else:
            self.patched = "no (--no-patch)"
        if o.deepcache:
            from sdkern import deepcache

            deepcache.enable(pipe)

    def _load_onnx(self) -> None:
        from sdkern.apps.onnx.pipeline import (
            OrtStableDiffusionPipeline,
            pipeline_geometry,
            read_manifest,
            resolve_provider,
        )

        o = self.opts
        provider = resolve_provider(o.provider, read_manifest(o.model))
        self.pipe = OrtStableDiffusionPipeline.from_pretrained(o.model, provider=provider)
        self.pipe.set_progress_bar_config(disable=True)
        self.geometry = pipeline_geometry(self.pipe, o.model)
        self.kind = "onnx"
        self.model_id = Path(o.model).resolve().name
        self.factor = int(self.geometry["vae_scale_factor"])
        self.native_size = int(self.geometry["sample_size"]) * self.factor
        self.channels = int(self.geometry["latent_channels"])
        self.base_scheduler_config = self.pipe.scheduler.config
        self.schedulers = ONNX_SCHEDULERS
        self.patched = "onnx"
        self.opts.device, self.opts.dtype = provider, str(self.geometry["dtype"].__name__)

    # ---------------------------------------------------------------- batching
    def batch_key(self, job: ImageJob) -> tuple[Any, ...]:
        """Jobs with equal keys can share one U-Net batch.

        Same size, steps and scheduler, and guidance on or off; the scale itself may differ per job on
        the torch SD path (it is applied per sample). Pipelines driven through their own ``__call__``
        (SDXL, ONNX) take one scale per call, so there the exact scale is part of the key.
        """
        guidance: Any = job.guidance > 1.0 if self.kind == "sd" else job.guidance
        return (job.width, job.height, job.steps, job.scheduler, guidance)

    # ---------------------------------------------------------------- running
    def generate(self, jobs: list[ImageJob]) -> list[Any]:
        """Run ``jobs`` (equal :meth:`batch_key`) as one batch.

        Parameters
        ----------
        jobs : list of ImageJob
            B jobs sharing a batch key.

        Returns
        -------
        list of PIL.Image.Image
            One image per job, in order.
        """
        if not jobs:
            return []
        keys = {self.batch_key(j) for j in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs of one batch must share a batch key, got {sorted(map(str, keys))}")
        if self.kind == "sd":
            return self._generate_sd(jobs)
        return self._generate_call(jobs)

    def _latents(self, jobs: list[ImageJob]) -> tuple[torch.Tensor, list[torch.Generator]]:
        j0 = jobs[0]
        shape = (self.channels, j0.height // self.factor, j0.width // self.factor)
        gens = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
        return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens

    @torch.inference_mode()
    def _generate_sd(self, jobs: list[ImageJob]) -> list[Any]:
        """The StableDiffusionPipeline denoising loop, with per-sample guidance scales.

        Each step is diffusers' own: ``scale_model_input``, the U-Net on ``[uncond; cond]``,
        ``uncond + g * (cond - uncond)``, ``scheduler.step`` with the per-job generators; then the VAE
        decode and diffusers' postprocessing.
        """
        pipe = self.pipe
        device = torch.device(self.opts.device)
        dtype = pipe.unet.dtype
        j0 = jobs[0]
        cfg = j0.guidance > 1.0
        sched = make_scheduler(j0.scheduler, self.base_scheduler_config)
        cpu_latents, gens = self._latents(jobs)
        cond, uncond = pipe.encode_prompt(
            [j.prompt for j in jobs], device, 1, cfg, negative_prompt=[j.negative_prompt for j in jobs]
        )
        emb = torch.cat([uncond, cond]) if cfg else cond
        sched.set_timesteps(j0.steps, device=device)
        from sdkern import deepcache

        dc = deepcache.state_of(pipe)
        if dc is not None:
            dc.reset(len(sched.timesteps))
        latents = cpu_latents.to(device, dtype) * sched.init_noise_sigma
        scales = {j.guidance for j in jobs}
        g: Any = (
            float(j0.guidance)
            if len(scales) == 1
            else torch.tensor([j.guidance for j in jobs], dtype=dtype, device=device).view(-1, 1, 1, 1)
        )
        import inspect

        params = inspect.signature(sched.step).parameters
        extra: dict[str, Any] = {}
        if "generator" in params:
            extra["generator"] = gens
        if "eta" in params:
            extra["eta"] = 0.0
        for t in sched.timesteps:
            x = torch.cat([latents] * 2) if cfg else latents
            x = sched.scale_model_input(x, t)
            noise = pipe.unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
            if cfg:
                n_uncond, n_cond = noise.chunk(2)
                noise = n_uncond + g * (n_cond - n_uncond)
            latents = sched.step(noise, t, latents, **extra, return_dict=False)[0]
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * len(jobs))

    def _generate_call(self, jobs: list[ImageJob]) -> list[Any]:
        """Through the pipeline's own ``__call__`` (SDXL, ONNX), as ``sdkern generate`` drives it."""
        from sdkern.apps.generate.pipelines import float_init_noise_sigma, seed_scheduler_noise

        pipe = self.pipe
        j0 = jobs[0]
        pipe.scheduler = make_scheduler(j0.scheduler, self.base_scheduler_config)
        self._hook_deepcache_reset(pipe.scheduler)
        cpu_latents, gens = self._latents(jobs)
        kwargs: dict[str, Any] = {}
        if j0.scheduler == "ddim":
            kwargs["eta"] = 0.0
        geo = self.geometry
        if geo is not None and geo["numpy_io"]:
            seed_scheduler_noise(pipe.scheduler, gens)
            float_init_noise_sigma(pipe.scheduler)
            kwargs["latents"] = cpu_latents.numpy().astype(geo["dtype"])
            kwargs["height"], kwargs["width"] = cpu_latents.shape[2] * 8, cpu_latents.shape[3] * 8
        else:
            if geo is not None:
                import numpy as np

                kwargs["latents"] = cpu_latents.to(torch.float32 if geo["dtype"] == np.float32 else torch.float16)
            else:
                kwargs["latents"] = cpu_latents.to(self.opts.device, getattr(torch, self.opts.dtype))
            kwargs["height"], kwargs["width"] = j0.height, j0.width
            kwargs["generator"] = gens
        with torch.inference_mode():
            result = pipe(
                prompt=[j.prompt for j in jobs],
                negative_prompt=[j.negative_prompt for j in jobs],
                num_inference_steps=j0.steps,
                guidance_scale=j0.guidance,
                output_type="pil",
                **kwargs,
            )
        return list(result.images)

    def _hook_deepcache_reset(self, sched: Any) -> None:
        """Restart DeepCache's step schedule when the pipeline's ``__call__`` sets ``sched``'s timesteps.

        ``deepcache.enable`` hooks the scheduler the pipeline had; this engine installs a fresh scheduler
        per batch, so without this hook the DeepCache state would carry its step count and step total
        from the previous batch into the next one.
        """
        if self.kind == "onnx":
            return
        from sdkern import deepcache

        dc = deepcache.state_of(self.pipe)
        if dc is None:
            return
        set_timesteps = sched.set_timesteps

        def hooked(*args: Any, **kwargs: Any) -> Any:
            out = set_timesteps(*args, **kwargs)
            dc.reset(len(sched.timesteps))
            return out

        sched.set_timesteps = hooked

    def warmup(self) -> float:
        """Run one small generation (native size, 2 steps, with guidance); return its seconds."""
        t0 = time.perf_counter()
        s = self.native_size
        self.generate([ImageJob("warmup", "", s, s, 2, 7.5, "ddim", 0)])
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- output
    def metadata(self, job: ImageJob) -> dict[str, Any]:
        """Generation parameters written into the PNG (the keys ``sdkern generate`` writes)."""
        import sdkern
        from sdkern.apps.generate.png import a1111_parameters

        settings = {
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "steps": job.steps,
            "guidance": job.guidance,
            "scheduler": job.scheduler,
            "eta": 0.0,
            "height": job.height,
            "width": job.width,
            "model": self.model_id,
            "dtype": self.opts.dtype,
            "device": self.opts.device,
            "patched": self.patched,
            "sdkern": sdkern.__version__,
        }
        return {**settings, "seed": job.seed, "parameters": a1111_parameters(settings, job.seed)}

    def png(self, job: ImageJob, image: Any) -> bytes:
        """``image`` encoded as PNG with :meth:`metadata` in tEXt chunks."""
        from sdkern.apps.generate.png import png_info

        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=png_info(self.metadata(job)))
        return buf.getvalue()
