"""Roofline counts against hand-computed numbers on the meta device."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from sdkern.bench import roofline as rl
from sdkern.cli import main


def test_tiny_counts_match_hand_count() -> None:
    counts = rl.count_unet("tiny", 32, 32, batch=2, dtype=torch.float32)
    # conv_in of the tiny U-Net: 4 -> 32 channels, 3x3, on 2 x 16x16 latents.
    conv_in = 2.0 * (2 * 32 * 16 * 16) * (4 * 9)
    assert counts["conv"].flops > conv_in

    # Attention: one transformer in the down block and two in the up block (32 ch, 16x16 = 256 tokens, 2 heads of
    # 16), one in the mid block (64 ch, 8x8 = 64 tokens, 2 heads of 32): self (Sk = Sq) + cross (Sk = 77) each.
    def attn(b: int, heads: int, sq: int, sk: int, d: int) -> float:
        return 2.0 * b * heads * sq * sk * 2 * d + 5.0 * b * heads * sq * sk

    want = 3 * (attn(2, 2, 256, 256, 16) + attn(2, 2, 256, 77, 16)) + attn(2, 2, 64, 64, 32) + attn(2, 2, 64, 77, 32)
    assert counts["attention"].flops == pytest.approx(want)
    assert counts["attention"].calls == 8
    assert counts["norms"].calls > 0 and counts["elementwise"].bytes > 0
    assert all(c.flops > 0 and c.bytes > 0 for c in counts.values())


def test_sd15_total_flops_in_known_range() -> None:
    # The SD 1.5 U-Net at 64x64 latents is commonly quoted at ~0.8 TFLOP per image (≈400 GMAC).
    counts = rl.count_unet("sd15", 512, 512, batch=1, dtype=torch.float16)
    total = sum(c.flops for c in counts.values())
    assert 0.7e12 < total < 0.9e12
    floor = rl.floor_seconds(counts, rl.DEVICES["H100"], torch.float16)
    assert 0 < floor["total"] < rl.floor_seconds(counts, rl.DEVICES["A100"], torch.float16)["total"]


def test_roofline_command_json(tmp_path: Path) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(
            [
                "roofline",
                "--preset",
                "tiny",
                "--height",
                "32",
                "--width",
                "32",
                "--peak-tflops",
                "10",
                "--bandwidth-gbs",
                "100",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["unet_batch"] == 2 and set(r["floor_ms"]) == {"A100-SXM4-80GB", "H100-SXM5-80GB", "custom"}
    assert set(r["classes"]) == set(rl.CLASSES)
    assert "attention" in out.getvalue()
