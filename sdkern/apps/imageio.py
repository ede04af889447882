"""Input images of ``sdkern generate``: init image, inpainting mask and ControlNet conditioning image.

Each loader returns a PIL image or raises one-line errors: :class:`OSError` for a file that is missing or
not a readable image (the command's exit status 1), :class:`ValueError` for an image that is readable but
not usable (exit 2): a mask in colour, or a mask whose aspect ratio differs from the init image's.

A mask with the init image's aspect ratio but another size is resized to the init image's size
(nearest neighbour, so its edges stay hard) with a logged warning; one with another aspect ratio is
refused, since stretching it would mask other pixels than the ones drawn.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("sdkern")

#: PIL modes read as a grayscale mask directly (1 bit, 8/16/32-bit gray, float, gray + alpha).
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def open_image(path: str, option: str) -> Any:
    """Read ``path`` fully into a PIL image (its own mode).

    Parameters
    ----------
    path : str
        Image file.
    option : str
        The command-line option that named it, used in error messages (e.g. ``"--init-image"``).

    Raises
    ------
    OSError
        ``path`` does not exist, is a directory, cannot be read, or is not an image PIL can decode.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path}: is a directory, not an image")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except UnidentifiedImageError:
        raise OSError(f"{option} {path}: not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data, unreadable file
        raise OSError(f"{option} {path}: cannot read the image ({type(e).__name__}: {e})") from None


def load_rgb(path: str, option: str) -> Any:
    """``path`` as an RGB PIL image (an alpha channel is dropped, palette and gray images are expanded)."""
    im = open_image(path, option)
    return im if im.mode == "RGB" else im.convert("RGB")


def load_mask(path: str, size: tuple[int, int] | None = None, option: str = "--mask", resize: bool = True) -> Any:
    """``path`` as an 8-bit grayscale (``"L"``) mask: white repaints, black keeps.

    Parameters
    ----------
    path : str
        Mask file: a grayscale image, or RGB(A) / palette whose pixels are all gray (alpha is ignored).
    size : (width, height), optional
        The init image's size. A mask of the same aspect ratio (within 1%) but another size is resized to
        it (nearest neighbour) with a warning; another aspect ratio is refused.
    option : str
        The command-line option, for messages.
    resize : bool
        False: check only (the mask is returned at its own size, nothing is logged).

    Raises
    ------
    OSError
        As :func:`open_image`.
    ValueError
        A colour mask, a mode that is not an image of gray levels (e.g. CMYK), or another aspect ratio.
    """
    import numpy as np

    im = open_image(path, option)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im)[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            raise ValueError(
                f"{option} {path}: mode {im.mode} with colour pixels; a mask must be grayscale "
                "(white = repaint, black = keep)"
            )
        mask = im.convert("RGB").convert("L")
    elif im.mode in GRAY_MODES:
        if im.mode in ("I", "I;16", "F"):  # wider gray: scale the range to 0..255
            a = np.asarray(im, dtype=np.float64)
            top = 1.0 if im.mode == "F" else 65535.0
            from PIL import Image

            mask = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8))
        else:
            mask = im.convert("L")
    else:
        raise ValueError(
            f"{option} {path}: mode {im.mode} is not a mask; give a grayscale image (white = repaint, black = keep)"
        )
    if size is not None and mask.size != tuple(size):
        (mw, mh), (w, h) = mask.size, size
        if abs(mw / mh - w / h) > 0.01 * (w / h):
            raise ValueError(
                f"{option} {path}: {mw}x{mh} does not match the init image's {w}x{h} and has another aspect "
                f"ratio: refused (not resized); give a {w}x{h} mask"
            )
        if not resize:
            return mask
        from PIL import Image

        logger.warning("sdkern: %s %s: %dx%d resized to the init image's %dx%d (nearest)", option, path, mw, mh, w, h)
        mask = mask.resize((w, h), Image.NEAREST)
    return mask


def fit(image: Any, width: int, height: int, option: str, resample: str = "lanczos") -> Any:
    """``image`` resized to ``width`` x ``height`` (logged when it changes), else as is."""
    if image.size == (width, height):
        return image
    from PIL import Image

    logger.info("sdkern: %s %dx%d resized to %dx%d", option, *image.size, width, height)
    return image.resize((width, height), Image.LANCZOS if resample == "lanczos" else Image.NEAREST)


def output_size(image: Any, height: int | None, width: int | None, factor: int = 8) -> tuple[int, int]:
    """(height, width) of the output: the given sizes, else the image's rounded down to multiples of ``factor``."""
    w, h = image.size
    return (height or max(factor, h // factor * factor), width or max(factor, w // factor * factor))
