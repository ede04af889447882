"""ORT's optimiser runs its shape inference on a weightless view of the model (sdkern.onnx._ort_compat).

Without it every fusion that re-runs symbolic shape inference copied the whole model; on the fp32 SD1.5
U-Net the optimiser's RSS reached 24 GB (CI was killed). These tests check, on the tiny preset, that the
view changes nothing in the optimised model and that shape inference never sees the weights.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

import onnx

from sdkern.onnx import _ort_compat
from sdkern.onnx.build import optimize_component
from sdkern.onnx.export import export_component


@pytest.fixture(scope="module")
def raw_unet(tiny_pipe, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw-unet")
    holder = types.SimpleNamespace(unet=tiny_pipe.unet, text_encoder=None, vae=None, tokenizer=None)
    export_component(holder, "unet", root / "model.onnx")
    return root / "model.onnx"


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def _optimise(src: Path, dst: Path, fp16: bool) -> onnx.ModelProto:
    optimize_component(src, dst, "unet", "cpu", fp16=fp16)
    return onnx.load(str(dst))


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_weightless_shape_inference_gives_the_same_model(raw_unet, tmp_path, monkeypatch, fp16):
    seen: list[int] = []
    with _ort_compat.patched_fusions():
        assert _ort_compat._helper_classes(), "onnxruntime.transformers has no SymbolicShapeInferenceHelper"
    real_weightless = _ort_compat._weightless

    def spy(model):
        light = real_weightless(model)
        seen.append(_weight_bytes(light))
        return light

    monkeypatch.setattr(_ort_compat, "_weightless", spy)
    got = _optimise(raw_unet, tmp_path / "light" / "model.onnx", fp16)
    assert seen, "the optimiser never ran shape inference through the patched helper"
    full = _weight_bytes(onnx.load(str(raw_unet)))  # the fp32 weights the optimiser loads
    # what shape inference saw: biases, norm parameters and shape constants, not the weights (on the
    # tiny U-Net the small tensors are ~13 % of all bytes; on SD1.5 under 0.1 %)
    assert max(seen) < 0.2 * full, (seen, full)

    monkeypatch.setattr(_ort_compat, "WEIGHTLESS_ABOVE", 2**62)  # everything kept: ORT's own behaviour
    want = _optimise(raw_unet, tmp_path / "full" / "model.onnx", fp16)
    assert [(n.op_type, n.domain, list(n.input), list(n.output)) for n in got.graph.node] == [
        (n.op_type, n.domain, list(n.input), list(n.output)) for n in want.graph.node
    ]
    assert {t.name: t.SerializeToString() for t in got.graph.initializer} == {
        t.name: t.SerializeToString() for t in want.graph.initializer
    }


def test_weightless_view_keeps_small_constants_and_types(raw_unet):
    model = onnx.load(str(raw_unet))
    light = _ort_compat._weightless(model)
    big = {t.name: t for t in model.graph.initializer if len(t.dims) and _numel(t) > _ort_compat.WEIGHTLESS_ABOVE}
    assert big, "the tiny U-Net has no initializer above the threshold: the test would not test anything"
    assert {t.name for t in light.graph.initializer} == {t.name for t in model.graph.initializer} - set(big)
    inputs = {i.name: i for i in light.graph.input}
    for name, t in big.items():
        vi = inputs[name].type.tensor_type
        assert vi.elem_type == t.data_type and [d.dim_value for d in vi.shape.dim] == list(t.dims)
    assert len(light.graph.node) == len(model.graph.node)
    assert len(model.graph.initializer) == len(onnx.load(str(raw_unet)).graph.initializer)  # input untouched


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n
