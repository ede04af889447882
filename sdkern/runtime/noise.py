"""Initial noise drawn on the CPU with the user's generator, then moved: the same seed gives the same
latents on every device (CUDA, DirectML, HPU, CPU)."""

from __future__ import annotations

import torch


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard-normal tensor drawn on the CPU in float32, then cast and moved.

    Parameters
    ----------
    shape : tuple of int
        Output shape (B, ...).
    generator : torch.Generator or list of them, optional
        CPU generator(s); a list gives one generator per batch item (diffusers' convention).
    device, dtype
        Where and in which dtype the result lives.

    Returns
    -------
    Tensor of ``shape``.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [randn((1, *shape[1:]), g, "cpu", torch.float32) for g in generator]
        return torch.cat(parts).to(device=device, dtype=dtype)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"noise is drawn on the CPU: pass a CPU generator, not one on {generator.device}")
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def pipeline_latents(
    pipe: object,
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Unscaled initial latents for a diffusers pipeline, (B, C_latent, H/8, W/8).

    Pass the result as ``latents=`` to the pipeline call (which applies the scheduler's
    ``init_noise_sigma`` itself) so the noise is the same on every device.
    """
    unet = pipe.unet  # type: ignore[attr-defined]
    scale = getattr(pipe, "vae_scale_factor", 8)
    shape = (batch_size, unet.config.in_channels, height // scale, width // scale)
    return randn(shape, generator, device, dtype)
