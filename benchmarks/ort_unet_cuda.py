"""ONNX Runtime CUDA execution provider: ORT's own com.microsoft SD kernels vs sdkern's library.

Issue 5 asks for "a comparison with ORT's own com.microsoft CUDA kernels on the optimised U-Net". An
SD1.5-architecture U-Net (``sdkern.models`` preset, random weights; ``--preset tiny`` for a quick run)
is exported and optimised for the CUDA target exactly as ``sdkern optimize --target cuda`` does
(``sdkern.onnx.build.optimize_component``: ORT's optimiser, model_type "unet", fp16 by default), then
run in two sessions on ``CUDAExecutionProvider``:

* ``ort``:    the optimised graph as is (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd,
  SkipLayerNormalization, MultiHeadAttention, NhwcConv: ORT's CUDA kernels);
* ``sdkern``: the same graph after ``sdkern.onnx.convert_contrib`` (GroupNorm, SkipGroupNorm,
  BiasSplitGelu and BiasAdd run in libsdkern_ort's CUDA kernels on ORT's compute stream).

Inputs and outputs stay on the GPU (IO binding), timings are medians of ``--repeats`` runs after
warm-up, alternating between the sessions. Needs a CUDA GPU, onnxruntime-gpu and sdkern built with
CUDA; otherwise it writes ``{"skipped": reason}`` and exits with status 3 (run by gpu_check.sh, whose
summary then shows the step as not passed).

    python benchmarks/ort_unet_cuda.py --out ort_unet_cuda.json [--preset sd15] [--size 64] [--fp32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

SKIPPED = 3


def _skip(out: str, reason: str) -> int:
    print(f"skipped: {reason}")
    with open(out, "w") as f:
        json.dump({"skipped": reason}, f, indent=1)
    return SKIPPED


def _unavailable() -> str | None:
    try:
        import onnxruntime as ort
        import torch
    except ImportError as e:
        return f"missing package ({e})"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
    try:
        import sdkern.ort

        sdkern.ort.library_path()
    except Exception as e:  # noqa: BLE001 - any reason is reported
        return f"sdkern ORT library unavailable ({e})"
    return None


def _bound_run(session, feeds: dict, out_shape: tuple[int, ...], dtype):
    """A zero-argument callable running ``session`` on CUDA tensors through IO binding."""
    import torch

    out = torch.empty(out_shape, dtype=dtype, device="cuda")
    binding = session.io_binding()
    elem = {torch.float16: 10, torch.float32: 1, torch.int64: 7}  # ONNX TensorProto element types
    for name, t in feeds.items():
        binding.bind_input(name, "cuda", 0, elem[t.dtype], list(t.shape), t.data_ptr())
    binding.bind_output(session.get_outputs()[0].name, "cuda", 0, elem[dtype], list(out.shape), out.data_ptr())

    def run():
        session.run_with_iobinding(binding)
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="sd15", help="sdkern.models preset (default sd15)")
    ap.add_argument("--size", type=int, default=64, help="latent height/width (default 64 = 512x512 images)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="keep fp32 (default: fp16 as ORT's SD CUDA path)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)

    why = _unavailable()
    if why:
        return _skip(args.out, why)

    import onnxruntime as ort
    import torch

    import sdkern
    from sdkern.models import build
    from sdkern.onnx import convert_contrib, count_ops
    from sdkern.onnx.build import optimize_component
    from sdkern.onnx.export import export_component

    fp16 = not args.fp32
    dtype = torch.float16 if fp16 else torch.float32
    torch.manual_seed(0)
    unet = build(args.preset).unet.eval()
    with tempfile.TemporaryDirectory(prefix="sdkern-ort-cuda-") as tmp:
        root = Path(tmp)
        holder = types.SimpleNamespace(unet=unet, text_encoder=None, vae=None, tokenizer=None)
        raw = export_component(holder, "unet", root / "raw" / "model.onnx")
        optimize_component(raw, root / "ort" / "model.onnx", "unet", "cuda", fp16=fp16)
        import onnx

        fused = onnx.load(str(root / "ort" / "model.onnx"))
        (root / "sdkern").mkdir()
        converted = convert_contrib(fused)
        onnx.save_model(converted, str(root / "sdkern" / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data")  # fmt: skip
        counts = {"ort": count_ops(fused, "com.microsoft"), "sdkern": count_ops(converted, "sdkern")}

        def session(path: Path):
            so = sdkern.ort.session_options()
            so.log_severity_level = 3
            return ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])

        sessions = {"ort": session(root / "ort" / "model.onnx"), "sdkern": session(root / "sdkern" / "model.onnx")}
        cross = unet.config.cross_attention_dim
        feeds = {
            "sample": torch.randn(args.batch, 4, args.size, args.size, device="cuda").to(dtype),
            "timestep": torch.tensor([500] * args.batch, device="cuda", dtype=torch.int64),
            "encoder_hidden_states": torch.randn(args.batch, 77, cross, device="cuda").to(dtype),
        }
        wanted = {i.name for i in sessions["ort"].get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        types_ = {i.name: i.type for i in sessions["ort"].get_inputs()}
        if types_.get("timestep") == "tensor(float)":  # the exported timestep dtype
            feeds["timestep"] = feeds["timestep"].float()
        elif types_.get("timestep") == "tensor(float16)":
            feeds["timestep"] = feeds["timestep"].half()
        runs = {k: _bound_run(s, feeds, (args.batch, 4, args.size, args.size), dtype) for k, s in sessions.items()}
        outs = {k: r().float().clone() for k, r in runs.items()}
        diff = ((outs["sdkern"] - outs["ort"]).norm() / outs["ort"].norm()).item()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(3):
            for r in runs.values():
                r()
        torch.cuda.synchronize()
        for _ in range(args.repeats):
            for k, r in runs.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r()
                torch.cuda.synchronize()
                times[k].append((time.perf_counter() - t0) * 1e3)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"U-Net {args.preset} {args.batch}x4x{args.size}x{args.size} {'fp16' if fp16 else 'fp32'} on CUDA EP:")
    for k, v in med.items():
        print(f"  {k:7s} {v:8.2f} ms   fused ops: {counts[k]}")
    print(f"  ort / sdkern = {med['ort'] / med['sdkern']:.2f}x   rel L2(sdkern vs ort) = {diff:.2e}")
    doc = {
        "device": torch.cuda.get_device_name(0),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "sdkern": getattr(sdkern, "__version__", None),
        "python": platform.python_version(),
        "preset": args.preset,
        "shape": [args.batch, 4, args.size, args.size],
        "dtype": str(dtype),
        "fused_ops": counts,
        "median_ms": med,
        "ort_over_sdkern": med["ort"] / med["sdkern"],
        "rel_l2_sdkern_vs_ort": diff,
        "times_ms": times,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
