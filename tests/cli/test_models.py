"""sdkern.models: real architectures (parameter counts on the meta device) and deterministic weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from sdkern import models


@pytest.mark.parametrize(
    ("preset", "expected"),
    # Parameter counts of the published U-Nets (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
    # stabilityai/stable-diffusion-xl-base-1.0): 859.52M, 865.91M, 2567.46M.
    [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)],
)
def test_unet_parameter_counts(preset: str, expected: int) -> None:
    unet = models.build_component(preset, "unet", device="meta")
    assert models.count_parameters(unet) == expected
    assert all(p.is_meta for p in unet.parameters())


@pytest.mark.parametrize(
    ("preset", "index", "expected_millions"),
    # CLIP ViT-L/14 text tower 123.06M; OpenCLIP ViT-H text tower (23 layers) 340.39M; bigG with projection 694.66M.
    [("sd15", 0, 123.06), ("sd21", 0, 340.39), ("sdxl", 1, 694.66)],
)
def test_text_encoder_parameter_counts(preset: str, index: int, expected_millions: float) -> None:
    enc = models.build_component(preset, "text_encoder", index=index, device="meta")
    assert models.count_parameters(enc) / 1e6 == pytest.approx(expected_millions, abs=0.01)


def test_vae_parameter_count() -> None:
    vae = models.build_component("sd15", "vae", device="meta")
    assert models.count_parameters(vae) == 83_653_863  # the SD VAE (AutoencoderKL, 83.65M)


def test_build_is_deterministic_and_seed_dependent() -> None:
    a = models.build("tiny", seed=3)
    b = models.build("tiny", seed=3)
    c = models.build("tiny", seed=4)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    ta, tb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # No parameter left uninitialised (to_empty leaves garbage; NaN/inf or all-zero would show it).
    for m in (a.unet, a.vae, a.text_encoder):
        for name, p in m.named_parameters():
            assert torch.isfinite(p).all(), name
            assert p.abs().sum() > 0, name


def test_build_dtype_matches_float32_values() -> None:
    a = models.build("tiny", seed=1)
    b = models.build("tiny", seed=1, dtype=torch.bfloat16)
    for (name, pa), (_, pb) in zip(a.unet.named_parameters(), b.unet.named_parameters(), strict=True):
        assert pb.dtype == torch.bfloat16
        assert torch.equal(pa.to(torch.bfloat16), pb), name


def test_tokenizer_generated_offline(tmp_path) -> None:
    tok = models.make_tokenizer(cache_dir=tmp_path)
    assert tok.model_max_length == 77
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert max(ids) < 1000  # fits the tiny text encoder's vocabulary (and CLIP's 49408)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        models.build("sd3")
