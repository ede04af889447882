"""sdkern.runtime.allocator: glibc malloc tuning for CPU runs (always checked in a fresh subprocess,
because the tuning is process-wide and cannot be undone)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from sdkern.runtime import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Faults per allocate-touch-free cycle of a 48 MiB tensor after 8 settling cycles, without and with the
# tuning. 48 MiB is above glibc's largest mmap threshold (32 MiB), so by default every cycle maps fresh
# pages and faults each one in; tuned, the heap block freed by the previous cycle is reused.
_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from sdkern.runtime.allocator import tune_cpu_allocator
    tuning = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(8):  # settle: glibc places the first few blocks past small allocations made meanwhile
        t = torch.empty(12 << 20); t.fill_(1.0); del t
    f0 = faults()
    for i in range(8):
        t = torch.empty(12 << 20)
        t.fill_(float(i))
        del t
    again = tune_cpu_allocator() if tuning is not None else None
    print(json.dumps({
        "faults_per_cycle": (faults() - f0) / 8,
        "applied": None if tuning is None else tuning.applied,
        "settings": None if tuning is None else tuning.settings,
        "same_result": again is tuning,
    }))
    """
)


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True, timeout=120
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc tuning applies to Linux with glibc only")
def test_tuning_keeps_freed_memory_in_the_process():
    default, tuned = _probe("default"), _probe("tuned")
    pages = (48 << 20) // 4096
    assert default["faults_per_cycle"] > 0.5 * pages, default  # glibc maps and faults every cycle
    assert tuned["applied"] is True, tuned
    assert tuned["settings"] == {"M_TRIM_THRESHOLD": 1 << 30, "M_TOP_PAD": 64 << 20, "M_MMAP_MAX": 0}
    assert tuned["faults_per_cycle"] < 0.02 * pages, tuned  # the freed block is reused
    assert tuned["same_result"] is True  # a second call changes nothing and reports the first


def test_bad_thresholds_raise_before_anything_is_applied():
    with pytest.raises(ValueError, match="trim_threshold"):
        allocator.tune_cpu_allocator(trim_threshold=-1)
    with pytest.raises(ValueError, match="top_pad"):
        allocator.tune_cpu_allocator(top_pad=2**31)


def test_not_glibc_is_a_reported_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    t = allocator.tune_cpu_allocator()
    assert t.applied is False and "musl" in t.reason and t.settings == {}


@pytest.mark.parametrize(
    ("env", "flag", "want"),
    [(None, False, True), ("1", False, True), ("0", False, False), ("off", False, False), (None, True, False)],
)
def test_tuning_switch(monkeypatch, env, flag, want):
    if env is None:
        monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV_SWITCH, env)
    assert allocator.tuning_enabled(flag) is want


_RELEASE = textwrap.dedent(
    """
    import json
    import torch
    from sdkern.runtime.allocator import _rss_bytes, release_free_memory, tune_cpu_allocator
    tune_cpu_allocator()
    blocks = [torch.ones(16 << 20) for _ in range(8)]  # 8 x 64 MiB from the heap (no mmap once tuned)
    keep = torch.ones(1 << 10)  # allocated after them: the freed blocks are not at the top of the heap
    before = _rss_bytes()
    del blocks
    held = _rss_bytes()
    released = release_free_memory()
    print(json.dumps({"before": before, "held": held, "after": _rss_bytes(), "released": released}))
    """
)


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_free_memory_returns_what_the_tuned_allocator_keeps():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _RELEASE], capture_output=True, text=True, env=env, check=True, timeout=120
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    mib = 1 << 20
    assert r["held"] > r["before"] - 64 * mib, r  # tuned: the 512 MiB stay resident after the tensors are freed
    assert r["held"] - r["after"] > 448 * mib, r  # released: (nearly) all of them go back
    assert abs(r["released"] - (r["held"] - r["after"])) < 16 * mib, r  # what it reports is what went back
