"""setup_tools/check_cuda.py: the resource checker flags what it must (no nvcc run needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "setup_tools" / "check_cuda.py"


@pytest.fixture(scope="module")
def cc():
    spec = importlib.util.spec_from_file_location("sdkern_check_cuda", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


LOG = """ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_90'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_80'
ptxas info    : Function properties for _Z5spillPf
    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 50000 bytes smem, 380 bytes cmem[0]
"""


def test_parse_and_flag(cc, monkeypatch):
    monkeypatch.setattr(cc, "OPTIN_KERNELS", ("_Z4good",))  # its launcher opts in to more shared memory
    kernels = [cc.Kernel(arch=a, name=n, **r) for a, n, r in cc.parse_ptxas(LOG)]
    got = [(k.arch, k.name, k.regs, k.smem) for k in kernels]
    assert got == [(90, "_Z4goodPf", 40, 4096), (80, "_Z5spillPf", 255, 50000)]
    kernels[0].dyn_smem = 200 * 1024  # within sm_90's 227 KiB opt-in limit
    cc.check(kernels)
    assert kernels[0].problems == []
    assert any("local memory" in p for p in kernels[1].problems)
    assert any("static smem" in p for p in kernels[1].problems)
    over = cc.Kernel(arch=80, name="_Z4goodk", dyn_smem=170 * 1024)
    cc.check([over])
    assert any("limit" in p for p in over.problems)


def test_default_limit_without_opt_in(cc):
    """A kernel that does not opt in gets 48 KiB of static + dynamic shared memory (issue 19: skip_layer_norm
    cached 48 KiB of row sums next to 256 B of static scratch)."""
    fits = cc.Kernel(arch=90, name="skip_layer_norm_kernel<float, true, true>", smem=256, dyn_smem=48 * 1024 - 256)
    over = cc.Kernel(arch=90, name="skip_layer_norm_kernel<float, true, true>", smem=256, dyn_smem=48 * 1024)
    cc.check([fits, over])
    assert fits.problems == []
    assert any("48 KiB limit without opt-in" in p for p in over.problems)
    name = "void sdkern::cuda::(anonymous namespace)::skip_layer_norm_kernel<float, true, true>(const float*)"
    assert cc.dynamic_smem(name, {}) == 48 * 1024 - 8 * 8 * 4
    # <T, kVector, kCache, kSkip>: the kCache instantiations (with or without skip) take the row cache
    for skip in ("true", "false"):
        assert cc.dynamic_smem(name.replace("true, true>", f"true, true, {skip}>"), {}) == 48 * 1024 - 8 * 8 * 4
        assert cc.dynamic_smem(name.replace("true, true>", f"true, false, {skip}>"), {}) == 0


def test_missing_nvcc_fails_unless_cuda_off(cc, monkeypatch, capsys):
    monkeypatch.setattr(cc, "find_nvcc", lambda: None)
    monkeypatch.delenv("SDKERN_CUDA", raising=False)
    assert cc.main([]) == 1
    monkeypatch.setenv("SDKERN_CUDA", "OFF")
    assert cc.main([]) == 0
    assert "SDKERN_CUDA=OFF" in capsys.readouterr().out


def test_dynamic_smem_of_the_real_kernels(cc):
    attn = {48: 1, 64: 2, 80: 3, 128: 4, 160: 5}
    assert cc.dynamic_smem("void sdkern::cuda::attn::flash_attn_tc_kernel<__half, 128>(TcParams)", attn) == 4
    assert cc.dynamic_smem("void sdkern::cuda::gn::stats_vec_kernel<float, true>(Source)", attn) == 48 * 1024
    assert cc.dynamic_smem("void sdkern::cuda::gn::apply_vec_kernel<float, true>(Source)", attn) == 0
