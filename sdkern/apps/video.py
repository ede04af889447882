"""Image-to-video with Stable Video Diffusion for ``sdkern generate --frames`` and ``sdkern bench --pipeline svd``.

``generate_video`` writes the frames as PNGs (settings in their text chunks) and an animated WebP (GIF where
Pillow has no WebP support). ``bench_video`` times eager and patched pipeline calls on the same image,
seed and noise.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("sdkern")


@dataclass
class VideoSettings:
    """Options of one image-to-video run (``sdkern generate --frames``).

    Attributes
    ----------
    init_image : str
        The conditioning image (any format Pillow reads); resized to ``width`` x ``height``.
    frames : int or None
        Frames to generate (None: the preset's default, 25 for ``svd``, 4 for ``tiny-svd``).
    fps, motion_bucket_id, noise_aug_strength : conditioning of SVD (diffusers' defaults 7, 127, 0.02).
    decode_chunk_size : int or None
        Frames decoded at once by the temporal VAE (None: all).
    """

    init_image: str = ""
    frames: int | None = None
    steps: int = 25
    seed: int = 0
    height: int | None = None
    width: int | None = None
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    decode_chunk_size: int | None = None
    out: str = "outputs"
    preset: str = "svd"
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    patch: bool = True
    progress: bool = False


def read_image(path: str, option: str = "--init-image") -> Any:
    """Open ``path`` as an RGB PIL image, raising ``OSError`` with a one-line message naming ``option``.

    Raises
    ------
    OSError
        Missing file, a directory, no permission, or not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if p.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a directory, not an image")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError as e:
        raise OSError(f"{option} {path}: not an image Pillow can read") from e
    except OSError as e:  # permissions, truncated files
        raise OSError(f"{option} {path}: cannot read the image ({e.strerror or e})") from e


def is_video_preset(preset: str | None) -> bool:
    """True for the Stable Video Diffusion presets (``svd``, ``tiny-svd``)."""
    from sdkern.apps.models.configs import PRESETS

    cfg = PRESETS.get(preset or "")
    return cfg is not None and cfg.kind == "svd"


def _load(preset: str, model: str | None, dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    from sdkern.apps import models

    if model:
        return models.load(model, dtype=dtype, device=device)
    return models.build(preset, dtype=dtype, device=device, seed=seed)


def _geometry(pipe: Any, s: VideoSettings) -> tuple[int, int, int]:
    """(height, width, frames): the settings', else the preset's defaults (SVD: 576x1024, 25 frames)."""
    from sdkern.apps.models.configs import PRESETS

    cfg = PRESETS.get(s.preset)
    extra = cfg.extra if cfg is not None and not s.model else {}
    factor = getattr(pipe, "vae_scale_factor", 8)
    native = pipe.unet.config.sample_size * factor
    height = s.height or extra.get("default_height", native)
    width = s.width or (cfg.default_size if cfg is not None and not s.model else native)
    frames = s.frames or extra.get("default_frames", pipe.unet.config.num_frames)
    return height, width, frames


def _call(pipe: Any, image: Any, s: VideoSettings, height: int, width: int, frames: int, output_type: str) -> Any:
    return pipe(
        image,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=s.steps,
        fps=s.fps,
        motion_bucket_id=s.motion_bucket_id,
        noise_aug_strength=s.noise_aug_strength,
        decode_chunk_size=s.decode_chunk_size or frames,
        generator=torch.Generator("cpu").manual_seed(s.seed),
        output_type=output_type,
    ).frames


def generate_video(s: VideoSettings, pipe: Any | None = None) -> list[Path]:
    """Generate one video from ``s.init_image``; write its frames (PNG) and an animated WebP or GIF.

    Parameters
    ----------
    s : VideoSettings
    pipe : StableVideoDiffusionPipeline, optional
        Use this pipeline instead of building ``s.preset`` / loading ``s.model``.

    Returns
    -------
    list of Path
        The frame files (``<out>/video-<seed>/frame_000.png`` ...), then the animation (``<out>/video-<seed>.webp``).
    """
    from PIL import features

    from sdkern.apps.generate.pipelines import try_patch
    from sdkern.apps.generate.png import png_info

    image = read_image(s.init_image)
    if pipe is None:
        pipe = _load(s.preset, s.model, getattr(torch, s.dtype), s.device)
    patched = try_patch(pipe) if s.patch else "no (--no-patch)"
    if s.progress:  # diffusers' per-step bar, on stderr
        pipe.set_progress_bar_config(disable=False, leave=False, desc="sdkern generate", unit="step", mininterval=0)
    height, width, frames = _geometry(pipe, s)
    image = image.resize((width, height))
    t0 = time.perf_counter()
    with torch.no_grad():
        video = _call(pipe, image, s, height, width, frames, "pil")[0]
    seconds = time.perf_counter() - t0
    meta = {k: v for k, v in asdict(s).items() if k not in ("progress",)}
    meta.update(height=height, width=width, frames=frames, patched=patched, seconds=round(seconds, 3))
    out = Path(s.out)
    frame_dir = out / f"video-{s.seed}"
    frame_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(video):
        path = frame_dir / f"frame_{i:03d}.png"
        frame.save(path, pnginfo=png_info({**meta, "frame": i}))
        paths.append(path)
    ext = "webp" if features.check("webp") else "gif"
    anim = out / f"video-{s.seed}.{ext}"
    duration_ms = max(1, round(1000 / max(s.fps, 1)))
    extra = {"lossless": True} if ext == "webp" else {}
    video[0].save(anim, save_all=True, append_images=video[1:], duration=duration_ms, loop=0, **extra)
    paths.append(anim)
    logger.info("sdkern generate: %d frames in %.2fs -> %s", frames, seconds, anim)
    return paths


def bench_video(
    s: VideoSettings, batch_count: int = 2, engines: list[str] | None = None, image: Any = None
) -> list[dict[str, Any]]:
    """Time image-to-video pipeline calls: ``eager`` (diffusers as is), then ``sdkern`` (patched).

    The same conditioning image (``s.init_image``, or a fixed gradient when empty), seed and noise for
    every engine; ``max_abs_diff_vs_eager`` compares the decoded frames (values in [0, 1]).

    Returns
    -------
    list of dict
        One row per engine: ``engine``, ``median_latency``, ``latencies``, ``max_abs_diff_vs_eager``, ``status``.
    """
    import sdkern

    if image is None:
        image = read_image(s.init_image) if s.init_image else _gradient_image()
    pipe = _load(s.preset, s.model, getattr(torch, s.dtype), s.device, seed=s.seed)
    pipe.set_progress_bar_config(disable=not s.progress, leave=False, unit="step")
    height, width, frames = _geometry(pipe, s)
    image = image.resize((width, height))
    rows: list[dict[str, Any]] = []
    reference = None
    for name in engines or ["eager", "sdkern"]:
        row: dict[str, Any] = {"engine": name, "model": s.model or s.preset, "frames": frames, "steps": s.steps}
        row.update(height=height, width=width, dtype=s.dtype, device=s.device)
        rows.append(row)
        try:
            if name == "sdkern":
                sdkern.patch(pipe)
            elif name != "eager":
                raise ValueError(f"engine {name!r} is not available for --pipeline svd (eager, sdkern)")
            lat, output = [], None
            with torch.no_grad():
                for _ in range(max(1, batch_count)):
                    t = time.perf_counter()
                    output = _call(pipe, image, s, height, width, frames, "pt").float().cpu()
                    lat.append(time.perf_counter() - t)
        except Exception as e:  # one engine failing is a row's status, like sdkern bench
            logger.exception("sdkern bench: engine %s failed", name)
            row["status"] = f"error: {type(e).__name__}: {e}"
            continue
        finally:
            sdkern.unpatch(pipe)
        if name == "eager":
            reference = output
        row.update(
            median_latency=statistics.median(lat),
            average_latency=statistics.mean(lat),
            latencies=lat,
            max_abs_diff_vs_eager=float((output - reference).abs().max()) if reference is not None else None,
            status="ok",
        )
    return rows


def _gradient_image(size: int = 64) -> Any:
    from PIL import Image

    x = torch.linspace(0, 255, size)
    ramp = x[None, :].expand(size, size)
    rgb = torch.stack([ramp, x[:, None].expand(size, size), 255 - ramp])
    return Image.fromarray(rgb.permute(1, 2, 0).to(torch.uint8).numpy())


# ---- command line (called from sdkern.apps.cli) -------------------------------------------------------
def cli_generate(args: Any, parser: Any) -> int:
    """``sdkern generate --frames N --init-image PATH`` (an SVD preset or --model): write frames and animation."""
    from sdkern.apps.cli import options as cli

    if getattr(args, "onnx", None):
        parser.error("--frames / SVD presets: not available with --onnx (image-to-video runs on PyTorch)")
    if not args.model and not is_video_preset(args.preset):
        parser.error(f"--frames needs an image-to-video preset (svd, tiny-svd) or --model; got --preset {args.preset}")
    if not getattr(args, "init_image", None):
        parser.error("image-to-video needs the conditioning image: --init-image PATH")
    if args.n_samples != 1 or args.n_iter != 1:
        parser.error("--n-samples / --n-iter: image-to-video writes one video per run")
    device, dtype = cli._resolve_device(args, parser)
    cli._check_out_dir(args.out)
    read_image(args.init_image)  # a missing or unreadable image fails here, before any model is built
    cli._tune_malloc(args, device)
    s = VideoSettings(
        init_image=args.init_image,
        frames=args.frames,
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        out=args.out,
        preset=args.preset,
        model=args.model,
        dtype=dtype,
        device=device,
        patch=not args.no_patch,
        progress=not args.no_progress,
    )
    for path in generate_video(s):
        print(path)
    return 0


def cli_bench(args: Any, parser: Any) -> int:
    """``sdkern bench --pipeline svd``: eager vs patched image-to-video calls, the bench table."""
    import json as _json

    from sdkern.apps.bench import report
    from sdkern.apps.cli import options as cli

    preset = args.preset
    if not args.model and not is_video_preset(preset):
        if preset != "sd15":  # sd15 is bench's default: take the SVD preset instead
            parser.error(f"--pipeline svd needs --preset svd or tiny-svd (or --model), got --preset {preset}")
        preset = "svd"
    if args.roofline:
        parser.error("--roofline: the roofline model covers the SD/SDXL U-Nets, not --pipeline svd")
    init_image = getattr(args, "init_image", None)
    if init_image:
        read_image(init_image)
    for opt in ("json", "csv", "plot"):
        if getattr(args, opt):
            cli._check_out_file(getattr(args, opt), f"--{opt}")
    device, dtype = cli._resolve_device(args, parser)
    s = VideoSettings(
        init_image=init_image or "",
        frames=getattr(args, "frames", None),
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        preset=preset,
        model=args.model,
        dtype=dtype,
        device=device,
        progress=not args.no_progress,
    )
    busy = cli._warn_if_busy() if device.startswith("cpu") else None
    t0 = time.perf_counter()
    rows = bench_video(s, batch_count=args.batch_count, engines=args.engines or None)
    wall = time.perf_counter() - t0
    report.add_speedups(rows)
    print(report.format_table(rows))
    print(f"bench wall time {wall:.1f}s")
    meta = {"settings": asdict(s) | {"pipeline": "svd"}, "wall_s": wall, "busy": busy}
    if args.json:
        report.write_json(args.json, rows, meta)
    if args.csv:
        report.write_csv(args.csv, rows)
    if args.plot:
        report.plot(args.plot, rows, title=_json.dumps({"svd": s.model or s.preset, "frames": rows[0].get("frames")}))
    return 1 if any(str(r.get("status", "")).startswith("error") for r in rows) else 0
