"""The CPU engine's gated GEGLU projection: ``value * gelu(gate)`` as two GEMMs with the GELU and the product in
their epilogues (sdkern/patch/cpu_engine_modules.py ``geglu``), and the weight held as two packed halves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdkern
from sdkern.patch import cpu_engine
from tests.patch import models as M
from tests.patch.common import NO_BF16_PRIMITIVES, needs_bf16_primitives
from tests.utils import assert_close, draws, fresh_seed, randn

pytestmark = pytest.mark.skipif(cpu_engine.unavailable_reason() is not None, reason="no usable oneDNN in this torch")

# (leading dims of x, in, F): SD1.5's three levels at 32x32 latents (bf16 cost ~ the real ones), odd sizes
SHAPES = [((2, 64, 32), 320, 1280), ((2, 16), 640, 2560), ((3, 7, 5), 24, 40), ((1, 1), 8, 1), ((2, 9), 33, 17)]


def _torch_geglu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    h = F.linear(x, w, b)
    f = w.shape[0] // 2
    return h[..., :f] * F.gelu(h[..., f:])


@needs_bf16_primitives
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_geglu_matches_float64(shape, dtype, bias):
    lead, cin, f = shape
    torch.manual_seed(fresh_seed())
    n = draws((*lead, f), most=512)  # tiny outputs: fresh draws judged together, >= 512 outputs (tests/utils.py)
    outs, refs, bases = [], [], []
    for _ in range(n):
        lin = nn.Linear(cin, 2 * f, bias=bias).to(dtype)
        w, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
        cpu_engine.pack_linear(lin, undo := [], gated=True)
        x = randn(*lead, cin, dtype=dtype)
        with torch.no_grad():
            outs.append(cpu_engine.geglu(lin, x).flatten())
        refs.append(_torch_geglu(x.double(), w.double(), None if b is None else b.double()).flatten())
        bases.append(_torch_geglu(x, w, b).flatten())
        undo[0]()
        assert torch.equal(lin.weight, w)
    assert outs[0].numel() == refs[0].numel()
    assert_close(torch.cat(outs), torch.cat(refs), dtype, baseline=torch.cat(bases), what=f"geglu {shape}")


def test_gated_form_is_refused_for_float32():
    """fp32 GEGLUs stay one GEMM + bias_split_gelu: oneDNN's fp32 erf-GELU post-op is a few ulp less accurate than
    torch's (a CI run measured 1.34e-7 vs a 1.28e-7 bound on a 1-output case) and the fp32 step was not faster."""
    lin = nn.Linear(8, 2 * 4)
    w0 = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_engine.pack_linear(lin, [], gated=True)
    assert type(lin) is nn.Linear and torch.equal(lin.weight, w0)


@needs_bf16_primitives
def test_gated_weight_is_held_once_and_read_written_exactly():
    lin = nn.Linear(12, 2 * 10).to(torch.bfloat16)
    orig, w0 = lin.weight, lin.weight.detach().clone()
    cpu_engine.pack_linear(lin, undo := [], gated=True)
    assert orig.numel() == 0 and lin.weight.is_mkldnn and tuple(lin.weight.shape) == (10, 12)
    assert torch.equal(lin.dense_weight(), w0) and torch.equal(lin.state_dict()["weight"], w0)
    x = randn(4, 12, dtype=torch.bfloat16)
    with torch.no_grad():  # called as a plain Linear (a wrapper's path): the full (.., 2F) projection
        torch.testing.assert_close(lin(x), F.linear(x, w0, lin.bias), rtol=1e-2, atol=1e-2)
    w1 = randn(20, 12, dtype=torch.bfloat16)
    cpu_engine.write_weight(lin, w1)  # LoRA's path: both halves re-packed
    assert torch.equal(lin.dense_weight(), w1)
    with torch.no_grad():
        assert_close(cpu_engine.geglu(lin, x), _torch_geglu(x.double(), w1.double(), lin.bias.double()),
                     torch.bfloat16, baseline=_torch_geglu(x, w1, lin.bias))  # fmt: skip
    undo[0]()
    assert lin.weight is orig and torch.equal(lin.weight, w1) and "_sdkern_gate" not in lin.__dict__


def test_patched_unet_runs_its_geglus_gated_in_bf16():
    """bf16 U-Nets run every GEGLU gated; fp32 ones keep one GEMM + bias_split_gelu (the gated form measured
    0.95-0.99x on the fp32 step), and so do bf16 ones on a CPU without bf16 primitives (weights held as fp32)."""
    bf16_gated = NO_BF16_PRIMITIVES is None
    for dtype, gated_expected in ((torch.bfloat16, bf16_gated), (torch.float32, False)):
        model = M.unet(M.SD1_SMALL_UNET).to(dtype)
        report = sdkern.patch(model, report=True)
        gated = [e for e in report.rewritten if "gate GEMMs" in e.detail]
        projs = [m.proj for m in model.modules() if type(m).__name__ == "SdkernGEGLU"]
        assert projs and len(gated) == (len(projs) if gated_expected else 0), dtype
        assert all(("_sdkern_gate" in p.__dict__) == gated_expected for p in projs), dtype
        sdkern.unpatch(model)
        assert all(type(p) is nn.Linear and "_sdkern_gate" not in p.__dict__ for p in projs)
    # PatchConfig(dtype=bfloat16) on an fp32 model: the engine sees bf16 weights, so gated (where it can be)
    model = M.unet(M.SD1_SMALL_UNET)
    sdkern.patch(model, dtype=torch.bfloat16)
    projs = [m.proj for m in model.modules() if type(m).__name__ == "SdkernGEGLU"]
    assert projs and all(("_sdkern_gate" in p.__dict__) == bf16_gated for p in projs)
    sdkern.unpatch(model)
