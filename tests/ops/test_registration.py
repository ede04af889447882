"""torch.library registration: schemas, fake kernels (opcheck), torch.compile, dispatch chains."""

from __future__ import annotations

import logging

import pytest
import torch

import sdkern
from sdkern.ops import OPS, SCHEMAS
from sdkern.ops._dispatch import Impl, run_chain
from tests.utils import randn


def _sample_args(op: str, dtype=torch.float32):
    if op == "group_norm":
        x = randn(2, 64, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return (x, randn(64), randn(64), 8, 1e-5, True)
    if op == "skip_group_norm":
        x = randn(2, 64, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return (x, randn(2, 64, dtype=dtype), randn(64), randn(64), randn(64), 8, 1e-5, True)
    if op == "bias_split_gelu":
        return (randn(2, 9, 64, dtype=dtype), randn(64))
    if op == "skip_layer_norm":
        return (randn(2, 9, 96, dtype=dtype), randn(2, 9, 96, dtype=dtype), randn(96), randn(96), randn(96), 1e-5)
    if op == "bias_add":
        return (randn(2, 9, 96, dtype=dtype), randn(96), randn(2, 9, 96, dtype=dtype))
    if op == "attention":
        return (
            randn(2, 33, 2, 40, dtype=dtype),
            randn(2, 37, 2, 40, dtype=dtype),
            randn(2, 37, 2, 40, dtype=dtype),
            None,
        )
    raise AssertionError(op)


def test_schemas_are_exact():
    for op in OPS:
        schema = str(getattr(torch.ops.sdkern, op).default._schema)
        assert schema == "sdkern::" + SCHEMAS[op], schema


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    # test_schema, test_faketensor, test_aot_dispatch_dynamic (inference: inputs need no grad)
    torch.library.opcheck(
        getattr(torch.ops.sdkern, op).default,
        _sample_args(op),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


# The optional forms: causal attention, skip_layer_norm without skip (a plain LayerNorm).
_VARIANTS = {
    "attention_causal": ("attention", lambda: (*_sample_args("attention")[:2], randn(2, 37, 2, 40), None, True)),
    "layer_norm": ("skip_layer_norm", lambda: (randn(2, 9, 96), None, randn(96), randn(96), None, 1e-5)),
}


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_opcheck_optional_forms(name):
    op, make = _VARIANTS[name]
    args = make()
    torch.library.opcheck(
        getattr(torch.ops.sdkern, op).default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    real = getattr(torch.ops.sdkern, op)(*args)
    meta = getattr(torch.ops.sdkern, op)(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    real, meta = (real, meta) if isinstance(real, tuple) else ((real,), (meta,))
    for r, m in zip(real, meta, strict=True):
        assert r.shape == m.shape and r.dtype == m.dtype


@pytest.mark.parametrize("op", OPS)
def test_meta_shapes_match_real(op):
    args = _sample_args(op)
    real = getattr(torch.ops.sdkern, op)(*args)
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    meta = getattr(torch.ops.sdkern, op)(*meta_args)
    real = real if isinstance(real, tuple) else (real,)
    meta = meta if isinstance(meta, tuple) else (meta,)
    for r, m in zip(real, meta, strict=True):
        assert r.shape == m.shape and r.dtype == m.dtype and r.stride() == m.stride()


def test_compile_fullgraph_cpu():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.g = torch.nn.Parameter(torch.randn(64))
            self.b = torch.nn.Parameter(torch.randn(64))

        def forward(self, x, temb):
            y = sdkern.ops.group_norm(x, self.g, self.b, 8, 1e-5, True)
            y2, s = sdkern.ops.skip_group_norm(y, temb, self.g, self.b, groups=8, silu=True)
            t = y2.flatten(2).transpose(1, 2)  # (N, HW, C)
            h = sdkern.ops.bias_add(t, self.b, t)
            return sdkern.ops.attention(h[:, :, None, :], h[:, :, None, :], h[:, :, None, :]) + s.mean()

    m = Block().eval()
    x, temb = randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last), randn(2, 64)
    with torch.no_grad():
        eager = m(x, temb)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x, temb)
        inductor = torch.compile(m, fullgraph=True)(x, temb)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(inductor, eager)


def test_other_devices_use_reference(caplog):
    # The meta device has only the fake kernel; an unknown backend goes to CompositeExplicitAutograd.
    # Simulate "other device" through the chain table used by sdkern.info.
    from sdkern.ops._library import chain, selected

    for op in OPS:
        assert [i.name for i in chain(op, "privateuseone")] == ["reference"]
        assert selected(op, "hpu")[0] == "reference"
        assert [i.name for i in chain(op, "cpu")] == ["cpp", "reference"]
        assert [i.name for i in chain(op, "cuda")][-1] == "reference"


def test_run_chain_fallback_and_errors(caplog):
    def refuse(*a):
        raise NotImplementedError("shape not handled")

    good = Impl("good", lambda x: x + 1)
    with caplog.at_level(logging.INFO, logger="sdkern"):
        assert run_chain("demo_op", "cpu", [Impl("fast", refuse), good], 1) == 2
        assert run_chain("demo_op", "cpu", [Impl("fast", refuse), good], 1) == 2
    assert sum("using good" in r.message for r in caplog.records) == 1  # logged once
    with pytest.raises(RuntimeError, match=r"fast: shape not handled; gone: not built"):
        run_chain("demo_op2", "cpu", [Impl("fast", refuse), Impl("gone", good.fn, lambda: "not built")], 1)


def test_cpu_kernel_falls_back_when_the_native_kernel_declines(monkeypatch, caplog):
    """The eager CPU path calls the C++ implementation directly; when it raises NotImplementedError
    the rest of the chain runs (once: the declined implementation is not retried) and it is logged."""
    from sdkern.ops import _library, reference

    calls = []

    def decline(*a):
        calls.append("cpp")
        raise NotImplementedError("layout not handled")

    chain = [(Impl("cpp", decline), None), (Impl("reference", reference.bias_add), None)]
    monkeypatch.setattr(_library, "_resolved", lambda op, dev: chain)
    kernel = _library._make_kernel("bias_add", "cpu")
    x, b, k = _sample_args("bias_add")
    with caplog.at_level(logging.INFO, logger="sdkern"):
        out = kernel(x, b, k)
    torch.testing.assert_close(out, reference.bias_add(x, b, k))
    assert calls == ["cpp"]
    assert any("using reference (cpp: layout not handled)" in r.message for r in caplog.records)


def test_cuda_impl_choice():
    from sdkern.ops import cuda_impl_order, set_cuda_impl

    before = cuda_impl_order()
    try:
        set_cuda_impl("cuda")
        assert cuda_impl_order() == ["cuda", "triton"]
        with pytest.raises(ValueError, match="SDKERN_CUDA_IMPL"):
            set_cuda_impl("cudnn")
    finally:
        set_cuda_impl(before[0])


def test_native_rejects_bad_sizes_without_crashing():
    from sdkern import _C

    with pytest.raises(ValueError, match="groups"):
        _C.group_norm(0, 0, 0, 0, 1, 30, 4, 7, 1e-5, False, 120, 1, 30, 0, 0)
    with pytest.raises(ValueError, match="non-null"):
        _C.bias_add(0, 0, 0, 0, 4, 8, 8, 8, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.bias_add(0, 0, 0, 0, 4, 8, 8, 8, 7, 0)
    with pytest.raises(ValueError):
        _C.attention(0, 0, 0, 0, 1, 1, 0, 1, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, False, 0)
    with pytest.raises(ValueError, match="causal"):  # Sq > Sk with causal: refused before any pointer is read
        _C.attention(0, 0, 0, 0, 1, 5, 3, 1, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, True, 0)


def test_poison_fixture_fills_nan(poison):
    assert torch.isnan(torch.empty(16)).all()


def test_empty_inputs():
    x = torch.empty(0, 320)
    assert sdkern.ops.bias_add(x, randn(320), x).shape == (0, 320)
    q = torch.empty(2, 0, 2, 40)
    assert sdkern.ops.attention(q, randn(2, 5, 2, 40), randn(2, 5, 2, 16)).shape == (2, 0, 2, 16)


def test_info_runs():
    text = sdkern.info()
    assert "op implementations" in text and "cpu" in text
    d = sdkern.info(as_dict=True)
    assert set(d["ops"]["cpu"]) == set(OPS)
