"""ONNX Runtime CPU execution provider: a small SD-style U-Net, unfused vs fused with sdkern's library.

The U-Net (diffusers UNet2DConditionModel, random weights, SD 1.x block layout at reduced width) is
exported with ``torch.onnx.export(dynamo=False)``. Two models run side by side in one process:

* ``plain``:  the export as is (ONNX Runtime's own CPU kernels, its default graph optimisations);
* ``sdkern``: after ``onnxruntime.transformers.optimizer`` (model_type "unet", NhwcConv off) and
  ``sdkern.onnx.convert_contrib(ops=CONTRIB_OPS)``: GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd,
  SkipLayerNormalization and MultiHeadAttention run in libsdkern_ort.

Usage::

    python benchmarks/ort_unet_cpu.py --out ort_unet_cpu.json [--repeats 10] [--threads N] [--size 32]

Inside ONNX Runtime sdkern's CPU kernels run on the session's intra-op thread pool. With
``SDKERN_ORT_THREADS=openmp`` they use their own OpenMP team instead (the behaviour before session 12);
then libgomp's default (active, spinning) wait policy makes the two pools steal each other's cores unless
``OMP_WAIT_POLICY=PASSIVE`` is set before the process starts. Both variables are recorded in the JSON.

Prints median latencies and ``plain_ms / sdkern_ms`` (> 1: the sdkern model is faster), the relative
L2 difference of the two outputs, and writes a JSON file with device, versions and raw timings. Runs
alternate between the two sessions so drifting machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import sdkern.onnx
import sdkern.ort


class _Wrap(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def build(size: int, workdir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size,
        layers_per_block=1,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    unet.set_attn_processor(AttnProcessor())  # the pattern ORT's optimiser fuses into MultiHeadAttention
    inputs = {
        "sample": torch.randn(2, 4, size, size),
        "timestep": torch.tensor([10, 10], dtype=torch.int64),
        "encoder_hidden_states": torch.randn(2, 77, 256),
    }
    path = workdir / "unet.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Wrap(unet), tuple(inputs.values()), str(path), input_names=list(inputs),
            output_names=["out_sample"], dynamo=False, opset_version=17,
        )  # fmt: skip
    return path, {k: v.numpy() for k, v in inputs.items()}


def fuse(path: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("unet")
    opts.enable_nhwc_conv = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(
            str(path), model_type="unet", num_heads=0, hidden_size=0, optimization_options=opts, opt_level=0,
            use_gpu=False,
        ).model  # fmt: skip
    return sdkern.onnx.convert_contrib(model, ops=sdkern.onnx.CONTRIB_OPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    ap.add_argument("--size", type=int, default=32, help="latent height/width")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path, feeds = build(args.size, Path(tmp))
        fused = fuse(path)
        counts = sdkern.onnx.count_ops(fused, "sdkern")

        def options(so=None):
            so = so or ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.log_severity_level = 3
            return so

        plain = ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
        ours = ort.InferenceSession(
            fused.SerializeToString(), sdkern.ort.session_options(options()), providers=["CPUExecutionProvider"]
        )
    out_plain, out_ours = plain.run(None, feeds)[0], ours.run(None, feeds)[0]  # warm-up
    diff = float(np.linalg.norm(out_ours - out_plain) / np.linalg.norm(out_plain))
    times: dict[str, list[float]] = {"plain": [], "sdkern": []}
    for _ in range(args.repeats):
        for name, sess in (("plain", plain), ("sdkern", ours)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"sdkern ops in the fused model: {counts}")
    print(f"plain {med['plain']:.1f} ms   sdkern {med['sdkern']:.1f} ms   ratio {med['plain'] / med['sdkern']:.2f}x")
    print(f"rel L2(sdkern - plain) = {diff:.2e}")
    result = {
        "benchmark": "ort_unet_cpu",
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "sdkern": sdkern.__version__},
        "args": vars(args),
        "env": {
            k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "SDKERN_ORT_THREADS")
        },
        "sdkern_ops": counts,
        "median_ms": med,
        "ratio_plain_over_sdkern": med["plain"] / med["sdkern"],
        "rel_l2_vs_plain": diff,
        "raw_ms": times,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
