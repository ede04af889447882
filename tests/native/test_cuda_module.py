"""sdkern._C_cuda without a GPU: the launchers validate arguments on the host before any CUDA call.

Checks that bad sizes / null pointers come back as ValueError naming the problem, that empty inputs
return without touching the device, and that the group-norm workspace size follows the sizes.
Skipped when the CUDA module was not built (no nvcc).
"""

from __future__ import annotations

import pytest

_C_cuda = pytest.importorskip("sdkern._C_cuda", reason="CUDA kernels not built")

F32, F16 = 0, 1


def test_build_info():
    info = _C_cuda.build_info()
    assert info["built"] is True
    assert info["archs"]


def test_invalid_arguments_raise_before_launch():
    with pytest.raises(ValueError, match="sizes"):
        _C_cuda.bias_add(8, 8, 8, 8, 4, 0, 0, 0, F32, F32, 0)
    with pytest.raises(ValueError, match="non-null"):
        _C_cuda.bias_split_gelu(0, 8, 8, 4, 16, 32, F16, F16, 0)
    with pytest.raises(ValueError, match="row stride"):
        _C_cuda.skip_layer_norm(8, 8, 8, 0, 0, 8, 8, 4, 64, 32, 64, 1e-5, F32, F32, 0)
    with pytest.raises(ValueError, match="divisible"):
        _C_cuda.group_norm(8, 8, 8, 8, 2, 30, 16, 4, 1e-5, False, 480, 1, 30, F32, F32, 8, 0)
    with pytest.raises(ValueError, match="workspace"):
        _C_cuda.group_norm(16, 16, 16, 16, 2, 32, 16, 4, 1e-5, False, 512, 1, 32, F32, F32, 0, 0)
    with pytest.raises(ValueError, match="skip"):
        _C_cuda.skip_group_norm(16, 0, 0, 16, 16, 16, 16, 2, 32, 16, 4, 1e-5, False, 512, 1, 32, 0, 0, 0,
                                F32, F32, F32, 16, 0)  # fmt: skip
    with pytest.raises(ValueError, match="Sk"):
        _C_cuda.attention(16, 16, 16, 16, 1, 4, 0, 1, 64, 64, *([64] * 9), 0.125, False, F16, 0)
    with pytest.raises(ValueError, match="causal"):
        _C_cuda.attention(16, 16, 16, 16, 1, 5, 4, 1, 64, 64, *([64] * 9), 0.125, True, F16, 0)


def test_empty_inputs_return_without_device_work():
    # zero rows / zero batch: validated and returned before any CUDA call (works without a GPU)
    _C_cuda.bias_add(0, 0, 0, 0, 0, 8, 8, 8, F32, F32, 0)
    _C_cuda.bias_split_gelu(0, 0, 0, 0, 4, 8, F16, F16, 0)
    _C_cuda.skip_layer_norm(0, 0, 0, 0, 0, 0, 0, 0, 64, 64, 64, 1e-5, F32, F32, 0)
    _C_cuda.group_norm(0, 0, 0, 0, 0, 32, 16, 4, 1e-5, True, 512, 1, 32, F32, F32, 0, 0)
    _C_cuda.attention(0, 0, 0, 0, 0, 4, 4, 1, 64, 64, *([64] * 9), 0.125, False, F16, 0)


def test_group_norm_workspace_bytes():
    assert _C_cuda.group_norm_workspace_bytes(0, 320, 4096, 32) == 0
    assert _C_cuda.group_norm_workspace_bytes(2, 320, 0, 32) == 0
    one = _C_cuda.group_norm_workspace_bytes(1, 320, 4096, 32)
    two = _C_cuda.group_norm_workspace_bytes(2, 320, 4096, 32)
    assert one > 0 and two == 2 * one and one % 4 == 0
    # at least the per-(n, group) mean and rstd, and bounded by 1024 chunks of partials
    for n, c, p, g in [(2, 320, 16384, 32), (1, 1280, 64, 32), (3, 12, 35, 3), (1, 6, 1, 2)]:
        nbytes = _C_cuda.group_norm_workspace_bytes(n, c, p, g)
        assert n * g * 2 * 4 < nbytes <= (n * g * 2 * 1024 + n * g * 2) * 4
