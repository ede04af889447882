"""Inside ONNX Runtime, sdkern's CPU kernels run on ORT's intra-op thread pool.

A second team of threads (OpenMP's) next to ORT's pool spins after every sdkern op and takes cores from
ORT's next op (benchmarks/results/cpu_engine_session11.md, section 7). Each case runs in a fresh process
without torch: ORT sessions are created first (their pools start), then every sdkern CPU op runs on
inputs large enough to be split across threads; a thread started during the runs would be a second
team. ``SDKERN_ORT_THREADS=openmp`` restores the old behaviour, which shows that the check can see one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import sdkern.ort

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
    reason="counts threads in /proc/self/task; needs at least 2 cores for any team to start",
)

# Runs in the child: argv[1] = library path. Prints "threads <before> <after>" and "maxerr <e>".
_CHILD = r"""
import os, sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

def model(op, inputs, outputs, **attrs):
    node = helper.make_node(op, [n for n, _ in inputs], [n for n, _ in outputs], domain="sdkern", **attrs)
    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
    g = helper.make_graph([node], op, [vi(n, s) for n, s in inputs], [vi(n, s) for n, s in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sdkern", 1)])
    m.ir_version = 8
    return m.SerializeToString()

so = ort.SessionOptions()
so.register_custom_ops_library(sys.argv[1])
so.intra_op_num_threads = 2
so.log_severity_level = 4
rng = np.random.default_rng(0)
f = lambda *s: rng.standard_normal(s, dtype=np.float32)
N, H, W, C, G = 2, 32, 32, 320, 32
M, D, heads, S = 2048, 640, 5, 1024
cases = [
    (model("GroupNorm", [("x", [N, H, W, C]), ("g", [C]), ("b", [C])], [("y", None)], groups=G, activation=1,
           channels_last=1), {"x": f(N, H, W, C), "g": f(C), "b": f(C)}),
    (model("SkipGroupNorm", [("x", [N, H, W, C]), ("g", [C]), ("b", [C]), ("s", [N, H, W, C])], [("y", None)],
           groups=G, activation=0, channels_last=1), {"x": f(N, H, W, C), "g": f(C), "b": f(C), "s": f(N, H, W, C)}),
    (model("BiasSplitGelu", [("x", [M, 2 * D]), ("b", [2 * D])], [("y", None)]), {"x": f(M, 2 * D), "b": f(2 * D)}),
    (model("BiasAdd", [("x", [M, D]), ("b", [D]), ("s", [M, D])], [("y", None)]),
     {"x": f(M, D), "b": f(D), "s": f(M, D)}),
    (model("SkipLayerNormalization", [("x", [M, D]), ("s", [M, D]), ("g", [D]), ("b", [D])], [("y", None)]),
     {"x": f(M, D), "s": f(M, D), "g": f(D), "b": f(D)}),
    (model("MultiHeadAttention", [("q", [2, S, D]), ("k", [2, S, D]), ("v", [2, S, D])], [("y", None)],
           num_heads=heads), {"q": f(2, S, D), "k": f(2, S, D), "v": f(2, S, D)}),
]
sessions = [ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]) for m, _ in cases]
before = len(os.listdir("/proc/self/task"))
outs = [s.run(None, feeds)[0] for s, (_, feeds) in zip(sessions, cases)]
for s, (_, feeds) in zip(sessions, cases):
    s.run(None, feeds)
after = len(os.listdir("/proc/self/task"))
# GroupNorm+SiLU in float64 (the run above must also be right, not only thread-free).
x = cases[0][1]["x"].astype(np.float64).reshape(N, H * W, G, C // G)
mu = x.mean(axis=(1, 3), keepdims=True)
var = x.var(axis=(1, 3), keepdims=True)
y = ((x - mu) / np.sqrt(var + 1e-5)).reshape(N, H, W, C) * cases[0][1]["g"] + cases[0][1]["b"]
y = y / (1 + np.exp(-y))
print("threads", before, after)
print("maxerr", float(np.abs(outs[0] - y).max()))
"""


def _run(threads_env: str | None) -> tuple[int, int, float]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("SDKERN_ORT_THREADS", None)
    if threads_env is not None:
        env["SDKERN_ORT_THREADS"] = threads_env
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(sdkern.ort.library_path())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fields = dict((line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if " " in line)
    before, after = (int(v) for v in fields["threads"].split())
    return before, after, float(fields["maxerr"])


def test_cpu_kernels_start_no_threads_inside_ort():
    before, after, err = _run(None)
    assert after == before, f"sdkern's ops started {after - before} thread(s) beside ORT's pool"
    assert err < 1e-4


def test_openmp_fallback_starts_a_team_the_check_can_see():
    before, after, err = _run("openmp")
    assert after > before, "with SDKERN_ORT_THREADS=openmp the kernels should start an OpenMP team"
    assert err < 1e-4
