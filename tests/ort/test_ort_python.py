"""sdkern.ort / sdkern.onnx Python helpers: library loading, session options, graph conversion."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.ort.ortutil import ort

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

import sdkern.onnx  # noqa: E402
import sdkern.ort  # noqa: E402


def test_import_sdkern_is_lazy():
    code = "import sys, sdkern; print('sdkern.onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_library_exports_only_register():
    path = sdkern.ort.library_path()
    assert path.is_file() and path.name.startswith("libsdkern_ort")
    nm = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True)
    if nm.returncode != 0:
        pytest.skip("nm not available")
    symbols = [line.split()[-1] for line in nm.stdout.splitlines() if line.split()[1:2] in (["T"], ["W"])]
    assert symbols == ["RegisterCustomOps"], symbols


def test_session_options():
    so = ort.SessionOptions()
    assert sdkern.ort.session_options(so) is so
    fresh = sdkern.ort.session_options(log_severity_level=3)
    assert isinstance(fresh, ort.SessionOptions) and fresh.log_severity_level == 3


def _ms_model(with_subgraph: bool = False) -> onnx.ModelProto:
    nodes = [
        helper.make_node("GroupNorm", ["x", "g", "b"], ["y"], domain="com.microsoft", groups=2, activation=1),
        helper.make_node("BiasAdd", ["y", "bias", "s"], ["z"], domain="com.microsoft"),
        helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=2),
        helper.make_node("Attention", ["z"], ["w"], domain="com.microsoft"),
        helper.make_node("Relu", ["z"], ["r"]),
    ]
    if with_subgraph:
        inner = helper.make_graph(
            [helper.make_node("BiasSplitGelu", ["z", "bb"], ["inner_out"], domain="com.microsoft")],
            "then",
            [],
            [helper.make_tensor_value_info("inner_out", TensorProto.FLOAT, None)],
        )
        nodes.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=inner, else_branch=inner))
    graph = helper.make_graph(nodes, "g", [], [])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def test_convert_contrib_default_ops():
    model = _ms_model(with_subgraph=True)
    out = sdkern.onnx.convert_contrib(model)
    assert out is model
    assert sdkern.onnx.count_ops(out, "sdkern") == {"GroupNorm": 1, "BiasAdd": 1, "BiasSplitGelu": 2}  # then + else
    assert sdkern.onnx.count_ops(out, "com.microsoft") == {"MultiHeadAttention": 1, "Attention": 1}
    assert [o.version for o in out.opset_import if o.domain == "sdkern"] == [1]
    sdkern.onnx.convert_contrib(out)  # idempotent: one opset import
    assert [o.domain for o in out.opset_import].count("sdkern") == 1


def test_convert_contrib_all_ops_and_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_ms_model(), str(path))
    out = sdkern.onnx.convert_contrib(path, ops=sdkern.onnx.CONTRIB_OPS)
    assert sdkern.onnx.count_ops(out, "sdkern") == {"GroupNorm": 1, "BiasAdd": 1, "MultiHeadAttention": 1}
    assert sdkern.onnx.count_ops(out, "com.microsoft") == {"Attention": 1}  # not ours: left alone


def test_convert_contrib_unknown_op():
    with pytest.raises(ValueError, match="Attention"):
        sdkern.onnx.convert_contrib(_ms_model(), ops=["Attention"])


def test_convert_nothing_adds_no_opset():
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g", [], []))
    sdkern.onnx.convert_contrib(model)
    assert all(o.domain != "sdkern" for o in model.opset_import)
