"""Inside ONNX Runtime, sdkern's CPU kernels run on ORT's intra-op thread pool.

A second team of threads (OpenMP's) next to ORT's pool spins after every sdkern op and takes cores from
ORT's next op (benchmarks/results/cpu_engine_session11.md, section 7). Each case runs in a fresh process
without torch: ORT sessions are created first (their pools start), then every sdkern CPU op runs on
inputs large enough to be split across threads; a thread started during the runs would be a second
team, and ORT's own second thread must have done part of the work (else the kernels ran serially).
``SDKERN_ORT_THREADS=openmp`` restores the old behaviour, which shows that the check can see a team; both
backends must give bit-identical outputs (the same static work split).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import sdkern.ort

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="counts threads in /proc/self/task; needs at least 2 cores for any team to start",
)

# Runs in the child: argv[1] = library path. Prints "threads <before> <after>", "others <CPU ticks of the
# threads other than the caller during the runs>", "maxerr <e>" and "digests <sha256 prefix per output>".
_CHILD = r"""
import hashlib, os, sys, threading
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
so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # pool threads use CPU only for work
rng = np.random.default_rng(0)
f = lambda *s: rng.standard_normal(s, dtype=np.float32)
N, H, W, C, G = 2, 32, 32, 320, 32
M, D, heads, S = 2048, 640, 5, 1024
cases = [
    (model("GroupNorm", [("x", [N, H, W, C]), ("g", [C]), ("b", [C])], [("y", None)], groups=G, activation=1,
           channels_last=1), {"x": f(N, H, W, C), "g": f(C), "b": f(C)}),
    (model("GroupNorm", [("x", [N, C, H, W]), ("g", [C]), ("b", [C])], [("y", None)], groups=G, activation=0,
           channels_last=0), {"x": f(N, C, H, W), "g": f(C), "b": f(C)}),
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

def cpu_ticks():  # CPU time (utime + stime, clock ticks) of every thread of this process
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return out

t0 = cpu_ticks()
outs = [s.run(None, feeds)[0] for s, (_, feeds) in zip(sessions, cases)]
for _ in range(5):
    for s, (_, feeds) in zip(sessions, cases):
        s.run(None, feeds)
t1 = cpu_ticks()
# CPU time of the threads other than this (the calling) one: ORT's pool thread, or an OpenMP team's.
others = sum(t1[t] - t0.get(t, 0) for t in t1 if t != threading.get_native_id())
# GroupNorm+SiLU in float64 (the run above must also be right, not only thread-free).
x = cases[0][1]["x"].astype(np.float64).reshape(N, H * W, G, C // G)
mu = x.mean(axis=(1, 3), keepdims=True)
var = x.var(axis=(1, 3), keepdims=True)
y = ((x - mu) / np.sqrt(var + 1e-5)).reshape(N, H, W, C) * cases[0][1]["g"] + cases[0][1]["b"]
y = y / (1 + np.exp(-y))
print("threads", len(t0), len(t1))
print("others", others)
print("maxerr", float(np.abs(outs[0] - y).max()))
print("digests", ",".join(hashlib.sha256(o.tobytes()).hexdigest()[:16] for o in outs))
"""


def _run(threads_env: str | None) -> dict[str, str]:
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
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


@functools.cache
def _pool() -> dict[str, str]:
    return _run(None)


@functools.cache
def _openmp() -> dict[str, str]:
    return _run("openmp")


def test_cpu_kernels_start_no_threads_inside_ort():
    before, after = (int(v) for v in _pool()["threads"].split())
    assert after == before, f"sdkern's ops started {after - before} thread(s) beside ORT's pool"
    assert float(_pool()["maxerr"]) < 1e-4


def test_cpu_kernels_use_orts_pool_thread():
    # Six rounds of seven ops (attention ~36 ms a call): ORT's second thread must have done part of it.
    # With ORT's parallel-for refused or the split at one, everything would run on the calling thread.
    assert int(_pool()["others"]) > 0, "nothing ran on ORT's pool thread"


def test_openmp_fallback_starts_a_team_the_check_can_see():
    before, after = (int(v) for v in _openmp()["threads"].split())
    assert after > before, "with SDKERN_ORT_THREADS=openmp the kernels should start an OpenMP team"
    assert int(_openmp()["others"]) > 0


def test_pool_and_openmp_give_identical_outputs():
    # The static work split is the same on both backends (same team size by default), so bit for bit.
    assert _pool()["digests"] == _openmp()["digests"]
