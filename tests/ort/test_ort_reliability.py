"""Regression tests for the ORT parts of issue 19 (each failed before its fix).

- item 2: MultiHeadAttention aborted (SIGABRT) when its scratch could not be allocated;
- item 3: MultiHeadAttention accepted ``scale = NaN`` and, on AVX2/AVX-512, turned NaN/Inf into finite output;
- item 7: attributes of the wrong type silently fell back to defaults (or were reported "missing");
- item 8: SkipGroupNorm accepted a skip of X's element count but another shape;
- item 10: "must be float or float, got float16".
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdkern.ops import reference
from tests.ort.ortutil import make_model, run, session
from tests.utils import randn

F32, F16 = torch.float32, torch.float16
ROOT = Path(__file__).resolve().parents[2]
SANITIZED = os.environ.get("SDKERN_SANITIZE") == "1"

GN_IO = ([("X", F32), ("gamma", F32), ("beta", F32)], [("Y", F32)])
MHA_IO = ([("query", F32), ("key", F32), ("value", F32)], [("output", F32)])


@pytest.mark.parametrize(
    ("op", "io", "attrs", "name", "expected", "got"),
    [
        ("GroupNorm", GN_IO, dict(groups=2, activation=0, channels_last=0.0), "channels_last", "int", "float"),
        ("GroupNorm", GN_IO, dict(groups=2, activation=0, epsilon=1), "epsilon", "float", "int"),
        ("GroupNorm", GN_IO, dict(groups=2.0, activation=0), "groups", "int", "float"),
        ("GroupNorm", GN_IO, dict(groups=2, activation="silu"), "activation", "int", "string"),
        ("GroupNorm", GN_IO, dict(groups=[2, 2], activation=0), "groups", "int", "ints"),
        ("MultiHeadAttention", MHA_IO, dict(num_heads=2, unidirectional=1.0), "unidirectional", "int", "float"),
        ("MultiHeadAttention", MHA_IO, dict(num_heads=2, scale=1), "scale", "float", "int"),
        ("MultiHeadAttention", MHA_IO, dict(num_heads=2.0), "num_heads", "int", "float"),
        (
            "SkipLayerNormalization",
            ([("input", F32), ("skip", F32), ("gamma", F32)], [("output", F32)]),
            dict(epsilon=0),
            "epsilon",
            "float",
            "int",
        ),
    ],
)
def test_wrong_attribute_type_names_both_types(op, io, attrs, name, expected, got):
    model = make_model(op, *io, **attrs)
    with pytest.raises(Exception, match=rf"sdkern\.{op}: attribute '{name}' must be of type {expected}, got {got}"):
        session(model)


def test_mha_rejects_non_finite_scale():
    for scale in (float("nan"), float("inf")):
        model = make_model("MultiHeadAttention", *MHA_IO, num_heads=2, scale=scale)
        with pytest.raises(Exception, match="'scale' must be a finite number"):
            session(model)


def test_skip_group_norm_checks_the_full_skip_shape():
    model = make_model(
        "SkipGroupNorm",
        [("X", F32), ("gamma", F32), ("beta", F32), ("skip", F32)],
        [("Y", F32)],
        groups=1,
        activation=0,
        channels_last=1,
    )
    x, g = randn(2, 3, 4, 8), randn(8)
    with pytest.raises(Exception, match=r"skip has shape \[2, 4, 3, 8\]"):
        run(model, {"X": x, "gamma": g, "beta": g, "skip": randn(2, 4, 3, 8)}, {"Y": (x.shape, F32)})


def test_param_type_message():
    model = make_model("BiasAdd", [("X", F32), ("bias", F16), ("skip", F32)], [("Y", F32)])
    x = randn(2, 8)
    with pytest.raises(Exception, match=r"bias must be float \(the type of X\), got float16") as ei:
        run(model, {"X": x, "bias": randn(8, dtype=F16), "skip": x}, {"Y": (x.shape, F32)})
    assert "float or float" not in str(ei.value)
    model = make_model("BiasAdd", [("X", F16), ("bias", F32), ("skip", F16)], [("Y", F16)])
    xh = randn(2, 8, dtype=F16)
    out = run(model, {"X": xh, "bias": randn(8), "skip": xh}, {"Y": (xh.shape, F16)})["Y"]
    assert torch.isfinite(out).all()


def test_mha_nan_inf_propagate_on_every_isa():
    """The ORT op runs the active ISA of the process; each level in a subprocess (SDKERN_CPU_ISA)."""
    from sdkern import _C

    for isa in _C.build_info()["isa_built"]:
        code = textwrap.dedent(
            """
            import torch
            from sdkern import _C
            from sdkern.ops import reference
            from tests.ort.ortutil import make_model, run
            torch.manual_seed(0)
            b, s, n, h, L = 1, 20, 2, 40, 77
            q, k, v = torch.randn(b, s, n, h), torch.randn(b, L, n, h), torch.randn(b, L, n, h)
            q[0, 3, 1, 2] = float("nan")
            k[0, 50, 0, :] = float("inf")
            model = make_model("MultiHeadAttention", [("query", torch.float32), ("key", torch.float32),
                               ("value", torch.float32)], [("output", torch.float32)], num_heads=n)
            feeds = {"query": q.reshape(b, s, n * h), "key": k.reshape(b, L, n * h), "value": v.reshape(b, L, n * h)}
            out = run(model, feeds, {"output": ((b, s, n * h), torch.float32)})["output"].reshape(b, s, n, h)
            ref = reference.attention(q, k, v)
            print("ISA", _C.cpu_isa(), "SAME", torch.equal(out.isnan(), ref.isnan()), int(ref.isnan().sum()))
            """
        )
        env = dict(
            os.environ, SDKERN_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = proc.stdout.strip().splitlines()[-1].split()
        if line[1] != isa:
            continue  # built but not supported by this CPU
        assert line[3] == "True" and int(line[4]) > 0, proc.stdout


@pytest.mark.skipif(SANITIZED or not sys.platform.startswith("linux"), reason="needs RLIMIT_AS (not under ASan)")
def test_mha_allocation_failure_is_an_error_not_an_abort():
    code = textwrap.dedent(
        """
        import resource
        import torch
        from tests.ort.ortutil import make_model, run
        def vm_bytes():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        L = 2**18  # 2**18 keys x (64 + 64) x 4 B: 128 MiB of scratch, the limit leaves 48 MiB
        q, kv = torch.randn(1, 1, 64), torch.randn(1, L, 1, 2, 64)
        model = make_model("MultiHeadAttention", [("query", torch.float32), ("key", torch.float32)],
                           [("output", torch.float32)], num_heads=1)
        run(model, {"query": q, "key": kv[:, :100].contiguous()}, {"output": ((1, 1, 64), torch.float32)})
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (48 << 20), resource.RLIM_INFINITY))
        try:
            run(model, {"query": q, "key": kv}, {"output": ((1, 1, 64), torch.float32)})
            print("RESULT ok")
        except Exception as e:
            print("RESULT error", e)
        """
    )
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"process died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "RESULT error" in proc.stdout and "out of memory" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_mha_scratch_limit_is_a_clean_error():
    code = textwrap.dedent(
        """
        import torch
        from tests.ort.ortutil import make_model, run
        q, kv = torch.randn(1, 3, 64), torch.randn(1, 5000, 1, 2, 64)
        model = make_model("MultiHeadAttention", [("query", torch.float32), ("key", torch.float32)],
                           [("output", torch.float32)], num_heads=1)
        try:
            run(model, {"query": q, "key": kv}, {"output": ((1, 3, 64), torch.float32)})
            print("RESULT ok")
        except Exception as e:
            print("RESULT error", e)
        """
    )
    env = dict(
        os.environ,
        SDKERN_ATTENTION_SCRATCH_MB="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT error" in proc.stdout and "SDKERN_ATTENTION_SCRATCH_MB" in proc.stdout, proc.stdout


def test_reference_is_the_oracle_used():
    # guard for the tests above: the float64 reference gives NaN where torch does
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    k[0, 1, 0, :] = float("inf")
    assert reference.attention(q, k, v).isnan().any()
