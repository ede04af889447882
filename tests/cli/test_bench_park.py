"""sdkern bench parks the torch U-Net's weights on disk while ONNX Runtime runs it, and puts them back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from sdkern.apps.bench.park import ParkedWeights
from sdkern.apps.models import build


def _snapshot(m: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
    return {k: (p, p.detach().clone()) for k, p in m.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_parked_weights_free_and_restore_bit_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    unet = build("tiny", dtype=dtype).unet
    before = _snapshot(unet)
    parked = ParkedWeights(unet, tmp_path / "unet")
    assert all(p.numel() == 0 and p.dtype == dtype for p in unet.parameters())  # storage freed, dtype kept
    assert list(parked.path.glob("*.safetensors"))
    parked.restore()
    assert not parked.path.exists()
    for k, p in unet.named_parameters():
        obj, value = before[k]
        assert p is obj, k  # the same Parameter objects (optimisers, hooks and other references stay valid)
        assert p.dtype == dtype and torch.equal(p, value), k
    parked.restore()  # a second restore is a no-op


def test_parked_checkpoint_is_the_export_childs_input(tmp_path: Path) -> None:
    """OrtUNet exports from the parked checkpoint (the U-Net's own weights freed) and matches eager."""
    pytest.importorskip("onnxruntime")
    from sdkern.apps.onnx import OrtUNet

    unet = build("tiny", dtype=torch.float32).unet
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim)
    t = torch.tensor(10.0)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ctx).sample
    parked = ParkedWeights(unet, tmp_path / "unet")
    ort_unet = OrtUNet.from_module(unet, "cpu", sdkern_ops=False, isolate=True, checkpoint=parked.path)
    try:
        got = ort_unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        ort_unet.close()
    parked.restore()
    assert float((got - want).norm() / want.norm()) < 1e-4
    with pytest.raises(ValueError, match="isolate=True"):
        OrtUNet.from_module(unet, "cpu", checkpoint=tmp_path)


def test_ort_engine_restores_the_unet_after_a_failed_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    from sdkern.apps.bench.engines import all_engines
    from sdkern.apps.onnx import OrtUNet

    pipe = build("tiny", dtype=torch.float32)
    unet = pipe.unet
    before = _snapshot(unet)

    def fail(*args: object, **kwargs: object) -> None:
        assert all(p.numel() == 0 for p in unet.parameters())  # parked while the export runs
        raise RuntimeError("export failed")

    monkeypatch.setattr(OrtUNet, "from_module", fail)
    with pytest.raises(RuntimeError, match="export failed"):
        all_engines()["ort"].setup(pipe)
    assert pipe.unet is unet
    for k, p in unet.named_parameters():
        assert p is before[k][0] and torch.equal(p, before[k][1]), k
