"""LoRA load/fuse/unfuse/switch against diffusers' PEFT path, on SD1.5-architecture models (CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from sdkern import lora  # noqa: E402
from sdkern.models.configs import SD15  # noqa: E402
from sdkern.runtime import graphs  # noqa: E402
from tests.runtime.test_graphs import FakeBackend  # noqa: E402

SD15_UNET = dict(SD15.unet)
TINY_UNET = dict(
    sample_size=16,
    cross_attention_dim=32,
    attention_head_dim=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _pipe(size: str):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**(SD15_UNET if size == "sd15" else TINY_UNET)).eval()
    te_cfg = transformers.CLIPTextConfig(
        vocab_size=1000, max_position_embeddings=77, **(SD15_TEXT if size == "sd15" else TINY_TEXT)
    )
    te = transformers.CLIPTextModel(te_cfg).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _random_lora(pipe, rank=4, unet_targets=("to_q", "to_k", "to_v", "to_out.0"), te=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in pipe.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(unet_targets):
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.05
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.05
    if te:
        for name, m in pipe.text_encoder.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                sd[f"text_encoder.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.05
                sd[f"text_encoder.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.05
    return sd


def _to_kohya(sd, alpha):
    out = {}
    for k, v in sd.items():
        comp, path = k.split(".", 1)
        path, kind = path.rsplit(".lora_", 1)
        prefix = "lora_unet_" if comp == "unet" else "lora_te_"
        base = prefix + path.replace(".", "_")
        out[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def _weights(pipe):
    return {
        **{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
        **{f"te.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
    }


def _diffusers_fused(pipe, sd):
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(copy.deepcopy(sd))
    ref.fuse_lora()
    ref.unload_lora_weights()  # drop PEFT wrappers, keep fused weights
    return _weights(ref)


def _assert_weights_close(a, b, rtol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-6, msg=k)


@torch.no_grad()
def test_sd15_fuse_matches_diffusers_and_unfuse_is_bit_exact():
    pipe = _pipe("sd15")
    before = {k: v.clone() for k, v in _weights(pipe).items()}
    sd = _random_lora(pipe)
    expected = _diffusers_fused(pipe, sd)
    lora.load(pipe, sd, adapter_name="style")
    _assert_weights_close(_weights(pipe), expected)
    assert sum(not torch.equal(before[k], v) for k, v in _weights(pipe).items()) == len(sd) // 2
    lora.unfuse(pipe)
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


@torch.no_grad()
def test_kohya_file_matches_diffusers(tmp_path):
    from safetensors.torch import save_file

    pipe = _pipe("tiny")
    sd = _random_lora(pipe)
    kohya = _to_kohya(sd, alpha=2.0)  # rank 4, alpha 2 -> scale 0.5
    path = tmp_path / "style.safetensors"
    save_file(kohya, str(path))
    expected = _diffusers_fused(pipe, kohya)
    lora.load(pipe, path, adapter_name="k")
    _assert_weights_close(_weights(pipe), expected)


@torch.no_grad()
def test_outputs_match_diffusers_after_fuse():
    pipe = _pipe("tiny")
    sd = _random_lora(pipe)
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(copy.deepcopy(sd))
    ref.fuse_lora()
    lora.load(pipe, sd)
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    torch.testing.assert_close(pipe.unet(x, 10, ehs).sample, ref.unet(x, 10, ehs).sample, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 1000, (2, 77))
    torch.testing.assert_close(pipe.text_encoder(ids)[0], ref.text_encoder(ids)[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_switching_among_three_adapters_is_exact():
    pipe = _pipe("tiny")
    base = {k: v.clone() for k, v in _weights(pipe).items()}
    sds = {n: _random_lora(pipe, seed=i) for i, n in enumerate("abc")}
    for n, sd in sds.items():
        lora.load(pipe, sd, adapter_name=n, fuse=False)
    assert lora.list(pipe) == {n: {"active": False, "weight": 1.0, "layers": len(sds[n]) // 2} for n in "abc"}

    def expected(mix):
        out = {}
        for k, v in base.items():
            comp, _, rest = k.partition(".")
            prefix = "unet" if comp == "unet" else "text_encoder"
            path = rest.rsplit(".", 1)[0]
            delta = torch.zeros_like(v)
            for n, w in mix.items():
                a = sds[n].get(f"{prefix}.{path}.lora_A.weight")
                if a is not None and rest.endswith("weight"):
                    delta += w * (sds[n][f"{prefix}.{path}.lora_B.weight"] @ a)
            out[k] = v + delta
        return out

    lora.set_adapters(pipe, ["a"], [1.0])
    first = {k: v.clone() for k, v in _weights(pipe).items()}
    _assert_weights_close(first, expected({"a": 1.0}), rtol=1e-5)
    lora.set_adapters(pipe, ["b", "c"], [0.5, 1.0])
    _assert_weights_close(_weights(pipe), expected({"b": 0.5, "c": 1.0}), rtol=1e-5)
    lora.set_adapters(pipe, "a", 1.0)
    assert all(torch.equal(first[k], v) for k, v in _weights(pipe).items())  # no drift
    lora.delete(pipe, ["a"])
    assert all(torch.equal(base[k], v) for k, v in _weights(pipe).items())
    assert set(lora.list(pipe)) == {"b", "c"}
    with pytest.raises(KeyError, match="unknown"):
        lora.set_adapters(pipe, ["zzz"])


@torch.no_grad()
def test_graph_runner_stays_valid():
    pipe = _pipe("tiny")
    backend = FakeBackend()
    runner = graphs.enable(pipe.unet, backend=backend)
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    before = pipe.unet(x, 10, ehs).sample
    lora.load(pipe, _random_lora(pipe))
    after = pipe.unet(x, 10, ehs).sample
    assert runner.captures == 1 and runner.invalidations == 0
    assert not torch.equal(before, after)
    graphs.disable(pipe.unet)
    torch.testing.assert_close(after, pipe.unet(x, 10, ehs).sample, rtol=0, atol=0)


def test_pickle_and_bad_files_are_refused(tmp_path):
    pipe = _pipe("tiny")
    sd = _random_lora(pipe)
    p = tmp_path / "lora.bin"
    torch.save(sd, p)
    with pytest.raises(ValueError, match="pickle"):
        lora.load(pipe, p)
    with pytest.raises(FileNotFoundError):
        lora.load(pipe, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="match"):
        lora.load(pipe, {"foo.lora_A.weight": torch.zeros(1)})
    bad = {k: (v[:, :3] if k.endswith("lora_A.weight") else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match="do not fit"):
        lora.load(pipe, bad, adapter_name="bad")
    lora.load(pipe, sd, adapter_name="x")
    with pytest.raises(ValueError, match="already loaded"):
        lora.load(pipe, sd, adapter_name="x")
    json.dumps(lora.list(pipe))


@torch.no_grad()
def test_patched_pipeline_lora_matches_unpatched():
    # Patched attention packs to_q/to_k/to_v into one tensor with the originals as views of it:
    # fusing in place must update the packed copy too, and unfuse must restore it bit-exactly.
    import sdkern

    pipe = _pipe("tiny")
    ref = copy.deepcopy(pipe)
    sd = _random_lora(pipe)
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    ids = torch.randint(0, 1000, (2, 77))
    sdkern.patch(pipe)
    before = pipe.unet(x, 10, ehs).sample
    lora.load(pipe, sd)
    lora.load(ref, sd)
    torch.testing.assert_close(pipe.unet(x, 10, ehs).sample, ref.unet(x, 10, ehs).sample, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pipe.text_encoder(ids)[0], ref.text_encoder(ids)[0], rtol=1e-4, atol=1e-5)
    lora.unfuse(pipe)
    assert torch.equal(pipe.unet(x, 10, ehs).sample, before)
    sdkern.unpatch(pipe)


def _digest(pipe) -> dict[str, str]:
    """sha256 of every parameter and buffer of the U-Net and text encoder (bytes, dtype, shape)."""
    import hashlib

    out = {}
    for k, v in _weights(pipe).items():
        t = v.detach().cpu().contiguous()
        out[k] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() + repr((t.dtype, t.shape)).encode()).hexdigest()
    return out


def _conv_lora(pipe, up_shape=None, rank=2):
    """A LoRA for every 3x3 conv of the U-Net's first ResnetBlock (kohya LoCon: down (r,in,3,3), up (out,r,1,1))."""
    sd = {}
    for name, m in pipe.unet.named_modules():
        if isinstance(m, torch.nn.Conv2d) and name.startswith("down_blocks.0.resnets.0.conv"):
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_channels, 3, 3) * 0.05
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(*(up_shape or (m.out_channels, rank, 1, 1))) * 0.05
    assert len(sd) == 4
    return sd


def _bad_loras(pipe) -> dict[str, tuple[dict, str]]:
    """Each: (a LoRA whose *last* layer is bad, so a non-atomic load would have fused the others; error match)."""
    good = _random_lora(pipe, te=False)
    key_a = next(k for k in reversed(good) if k.endswith("lora_A.weight"))
    key_b = key_a.replace("lora_A", "lora_B")
    a, b = good[key_a], good[key_b]
    conv_up = _conv_lora(pipe)
    conv_key = next(k for k in conv_up if k.endswith("lora_B.weight"))
    out = conv_up[conv_key].shape[0]
    return {
        "conv up (out, r, 3, 3)": ({**good, **conv_up, conv_key: torch.randn(out, 2, 3, 3)}, "do not fit"),
        "1-D down": ({**good, key_a: a[0]}, r"lora_A|down.*2-D or 4-D"),
        "1-D up": ({**good, key_b: b[:, 0]}, r"up.*2-D or 4-D"),
        "rank 0": ({**good, key_a: a[:0], key_b: b[:, :0]}, "rank 0"),
        "vector alpha": ({**good, key_a.replace(".lora_A.weight", ".alpha"): torch.ones(3)}, "alpha must be a scalar"),
        "NaN in up": ({**good, key_b: torch.full_like(b, float("nan"))}, "NaN"),
        "integer down": ({**good, key_a: a.to(torch.int32)}, "floating-point"),
        "out mismatch": ({**good, key_b: torch.randn(b.shape[0] + 1, b.shape[1])}, "do not fit"),
        "down without up": ({k: v for k, v in good.items() if k != key_b}, "lacks its up"),
    }


@torch.no_grad()
def test_conv_lora_fuses_like_diffusers_formula():
    pipe = _pipe("tiny")
    sd = _conv_lora(pipe)
    before = {k: v.clone() for k, v in _weights(pipe).items()}
    lora.load(pipe, sd)
    after = _weights(pipe)
    for k in sd:
        if k.endswith("lora_A.weight"):
            path = k[len("unet.") : -len(".lora_A.weight")]
            up = sd[k.replace("lora_A", "lora_B")]
            expected = before[f"unet.{path}.weight"] + (up.flatten(1) @ sd[k].flatten(1)).reshape(up.shape[0], -1, 3, 3)
            torch.testing.assert_close(after[f"unet.{path}.weight"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused_before", [False, True], ids=["clean", "another_adapter_active"])
def test_failed_load_changes_nothing(fused_before):
    """Issue 19 items 9/10: each bad LoRA raises a ValueError naming the layer; the pipeline stays bit-identical."""
    pipe = _pipe("tiny")
    if fused_before:
        lora.load(pipe, _random_lora(pipe, seed=1), adapter_name="kept", scale=0.7)
    digest = _digest(pipe)
    adapters = lora.list(pipe)
    for what, (sd, match) in _bad_loras(pipe).items():
        with pytest.raises(ValueError, match=match) as e:
            lora.load(pipe, sd, adapter_name="bad")
        assert "LoRA 'bad'" in str(e.value) or "alpha" in str(e.value), what
        assert _digest(pipe) == digest, f"{what}: weights changed by a failed load"
        assert lora.list(pipe) == adapters, f"{what}: adapter state changed"
    with pytest.raises(ValueError, match="scale must be finite"):
        lora.load(pipe, _random_lora(pipe), adapter_name="bad", scale=float("nan"))
    assert _digest(pipe) == digest and lora.list(pipe) == adapters


def test_failure_while_fusing_rolls_back(monkeypatch):
    """A failure inside the fuse (after some layers were written) restores the previous fused state bit-exactly."""
    pipe = _pipe("tiny")
    lora.load(pipe, _random_lora(pipe, seed=1), adapter_name="kept", scale=0.7)
    digest = _digest(pipe)
    adapters = lora.list(pipe)
    real_bmm, calls = torch.bmm, []

    def failing_bmm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real_bmm(*args, **kwargs)

    # two (out, in, rank) buckets at least, so the first was written before the failure
    sd = {**_random_lora(pipe, seed=2), **_conv_lora(pipe)}
    monkeypatch.setattr(torch, "bmm", failing_bmm)
    with pytest.raises(RuntimeError, match="injected"):
        lora.load(pipe, sd, adapter_name="new")
    monkeypatch.setattr(torch, "bmm", real_bmm)
    assert len(calls) >= 2
    assert _digest(pipe) == digest
    assert lora.list(pipe) == adapters
    lora.unfuse(pipe)
    lora.load(pipe, sd, adapter_name="new")  # and the same LoRA loads fine afterwards
    assert lora.list(pipe)["new"]["active"]
