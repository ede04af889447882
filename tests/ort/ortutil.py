"""One-op ONNX graphs run through sdkern's ORT library on the CPU execution provider.

Inputs and outputs are torch tensors shared with ONNX Runtime through IO binding (no copies), and
every output buffer is NaN-filled before the run, so an element the kernel fails to write fails the test.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

import sdkern.ort  # noqa: E402

ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}


class KernelNotBuilt(Exception):
    """The sdkern CPU launcher behind the op returned Unsupported (kernel not in this build yet)."""


def make_model(
    op: str,
    inputs: Sequence[tuple[str, torch.dtype] | None],
    outputs: Sequence[tuple[str, torch.dtype] | None],
    **attrs,
) -> bytes:
    """Serialized one-node model ``op`` (domain sdkern). ``None`` entries are omitted optional slots."""
    in_names = [i[0] if i else "" for i in inputs]
    out_names = [o[0] if o else "" for o in outputs]
    while in_names and not in_names[-1]:
        in_names.pop()
    while out_names and not out_names[-1]:
        out_names.pop()
    node = helper.make_node(op, in_names, out_names, domain="sdkern", **attrs)
    graph = helper.make_graph(
        [node],
        f"sdkern_{op}",
        [helper.make_tensor_value_info(n, ONNX_TYPE[t], None) for n, t in (i for i in inputs if i)],
        [helper.make_tensor_value_info(n, ONNX_TYPE[t], None) for n, t in (o for o in outputs if o)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sdkern", 1)])
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def session_options():
    return sdkern.ort.session_options(log_severity_level=4)


def session(model: bytes):
    return ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])


def _ortvalue(t: torch.Tensor):
    assert t.is_contiguous()
    if t.dtype == torch.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.int16).numpy(), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


def run(
    model: bytes, feeds: dict[str, torch.Tensor], outputs: dict[str, tuple[Sequence[int], torch.dtype]]
) -> dict[str, torch.Tensor]:
    """Run ``model`` with ``feeds``; ``outputs`` gives each bound output's expected shape and dtype.

    Outputs are preallocated NaN-filled tensors the kernel must overwrite. Raises KernelNotBuilt when
    the op's CPU kernel is still a placeholder (the error is an ORT NOT_IMPLEMENTED status).
    """
    sess = session(model)
    io = sess.io_binding()
    keep = []
    for name, t in feeds.items():
        t = t.contiguous()
        keep.append(t)
        io.bind_ortvalue_input(name, _ortvalue(t))
    result = {}
    for name, (shape, dtype) in outputs.items():
        buf = torch.full(tuple(shape), float("nan"), dtype=dtype)
        result[name] = buf
        io.bind_ortvalue_output(name, _ortvalue(buf))
    try:
        sess.run_with_iobinding(io)
    except Exception as e:  # ORT raises its own exception types
        if "not supported by this build" in str(e):
            raise KernelNotBuilt(str(e)) from e
        raise
    return result


def run_or_skip(*args, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`run`, skipping the test (with the reason) while the op's CPU kernel is not built."""
    try:
        return run(*args, **kwargs)
    except KernelNotBuilt as e:
        pytest.skip(f"CPU kernel not in this build yet: {e}")


def expect_error(model: bytes, feeds: dict[str, torch.Tensor], outs, match: str) -> None:
    """Running ``model`` raises an error matching ``match`` from sdkern's op (an ORT error, never a crash)."""
    with pytest.raises(Exception, match=match) as ei:
        run(model, feeds, outs)
    assert "sdkern" in str(ei.value) or "ONNXRuntimeError" in str(ei.value)


def nhwc_to_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def nchw_to_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)
