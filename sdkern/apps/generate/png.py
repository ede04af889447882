"""The written images: PNG text chunks (the run's settings, A1111's ``parameters`` line) and the grid."""

from __future__ import annotations

import json
from typing import Any


def png_info(meta: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    return info


def a1111_parameters(settings: dict[str, Any], seed: int) -> str:
    neg = f"\nNegative prompt: {settings['negative_prompt']}" if settings["negative_prompt"] else ""
    return (
        f"{settings['prompt']}{neg}\nSteps: {settings['steps']}, Sampler: {settings['scheduler']}, "
        f"CFG scale: {settings['guidance']}, Seed: {seed}, Size: {settings['width']}x{settings['height']}, "
        f"Model: {settings['model']}"
        + (f", Denoising strength: {settings['strength']}" if "strength" in settings else "")
        + (f", ControlNet: {settings.get('controlnet') or settings['model']}" if "control_image" in settings else "")
    )


def make_grid(images: list[Any], cols: int) -> Any:
    """Paste PIL images into a grid of ``cols`` columns."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
