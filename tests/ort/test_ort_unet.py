"""Model level: a tiny diffusers U-Net exported to ONNX, fused by ONNX Runtime's optimiser, converted
to the sdkern domain and run on the CPU execution provider with sdkern's library."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.ort.ortutil import KernelNotBuilt, ort, session_options
from tests.utils import rel_l2

pytest.importorskip("diffusers")

import sdkern.onnx


class _Wrap(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory):
    """(exported fp32 model path, inputs, float64 eager output) for a tiny random-weight U-Net."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    # The classic attention processor exports the MatMul/Softmax pattern ORT's optimiser fuses into
    # MultiHeadAttention (packed QKV / packed KV); the SDPA processor's export is not fused.
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    # Non-trivial norm parameters, so gamma/beta mistakes show.
    with torch.no_grad():
        for mod in unet.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and mod.weight is not None:
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([10, 500], dtype=torch.int64),
        "encoder_hidden_states": torch.randn(2, 77, 32),
    }
    path = tmp_path_factory.mktemp("unet") / "unet.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Wrap(unet),
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=["out_sample"],
            dynamo=False,
            opset_version=17,
        )
        ref64 = _Wrap(unet.double())(*(t.double() if t.is_floating_point() else t for t in inputs.values()))
    return path, inputs, ref64


def _fused(path, packed: bool):
    """The exported model after ONNX Runtime's U-Net fusions (NhwcConv off: it exists only for CUDA).

    ``packed``: MultiHeadAttention with packed QKV / packed KV inputs (ORT's own CPU kernel lacks them).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("unet")
    opts.enable_nhwc_conv = False
    opts.enable_packed_qkv = opts.enable_packed_kv = packed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(
            str(path),
            model_type="unet",
            num_heads=0,
            hidden_size=0,
            optimization_options=opts,
            opt_level=0,
            use_gpu=False,
        ).model
    ms = sdkern.onnx.count_ops(model, "com.microsoft")
    assert all(ms.get(op, 0) > 0 for op in sdkern.onnx.CONTRIB_OPS), ms
    return model


@pytest.fixture(scope="module")
def fused(unet_onnx):
    return _fused(unet_onnx[0], packed=True)


@pytest.fixture(scope="module")
def fused_unpacked(unet_onnx):
    return _fused(unet_onnx[0], packed=False)


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _fp16(model):
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(_copy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.convert_float_to_float16(keep_io_types=True)
    return wrapped.model


def _run(model, inputs, so=None):
    if so is None:
        so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    try:
        out = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    except Exception as e:
        if "not supported by this build" in str(e):
            pytest.skip(f"a CPU kernel is not in this build yet: {KernelNotBuilt(str(e))}")
        raise
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("ops", ["default", "all"])
def test_unet_fp32(unet_onnx, ops, request):
    """default: sdkern's four CPU-missing ops, ORT's own CPU SkipLayerNorm and (unpacked) MHA;
    all: every fused op through sdkern, MultiHeadAttention in the packed QKV / KV forms."""
    import onnx

    path, inputs, ref64 = unet_onnx
    fused = request.getfixturevalue("fused_unpacked" if ops == "default" else "fused")
    ms = sdkern.onnx.count_ops(fused, "com.microsoft")
    selected = sdkern.onnx.CONTRIB_OPS if ops == "all" else None
    converted = sdkern.onnx.convert_contrib(_copy(fused), ops=selected)
    counts = sdkern.onnx.count_ops(converted, "sdkern")
    left = sdkern.onnx.count_ops(converted, "com.microsoft")
    for op in sdkern.onnx.DEFAULT_OPS:  # every fused node of these types moved
        assert counts.get(op, 0) == ms.get(op, 0) and op not in left, (counts, left)
    if ops == "all":
        assert counts == ms and not left, (counts, left)
    print(f"\nfused com.microsoft ops: {ms}\nconverted to sdkern: {counts}")

    out_plain = _run(onnx.load(str(path)), inputs)
    out = _run(converted, inputs, session_options())
    assert out.shape == out_plain.shape and torch.isfinite(out).all()
    err_plain, err = rel_l2(out_plain, ref64), rel_l2(out, ref64)
    print(f"fp32 rel L2 vs float64 eager: unoptimised ORT {err_plain:.2e}, sdkern {err:.2e}")
    assert err <= 2 * err_plain + 1e-6, (err, err_plain)
    assert rel_l2(out, out_plain) <= 1e-4


def test_unet_fp16(unet_onnx, fused):
    """fp16 weights and activations (fp32 I/O): the fused model against the unfused model in fp16."""
    import onnx

    path, inputs, ref64 = unet_onnx
    converted = sdkern.onnx.convert_contrib(_fp16(fused), ops=sdkern.onnx.CONTRIB_OPS)
    counts = sdkern.onnx.count_ops(converted, "sdkern")
    assert all(counts.get(op, 0) > 0 for op in sdkern.onnx.DEFAULT_OPS), counts
    out_plain = _run(_fp16(onnx.load(str(path))), inputs)
    out = _run(converted, inputs, session_options())
    assert torch.isfinite(out).all()
    err_plain, err = rel_l2(out_plain, ref64), rel_l2(out, ref64)
    print(f"\nfp16 rel L2 vs float64 eager: unoptimised ORT fp16 {err_plain:.2e}, sdkern {err:.2e}")
    assert err <= 2 * err_plain + 1e-4, (err, err_plain)
