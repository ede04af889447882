"""Backend selection with fake vendor modules (torch_directml, habana_frameworks)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from sdkern.runtime import backends, noise


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = None
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


@pytest.fixture
def clean_modules(monkeypatch):
    for name in list(sys.modules):
        if name.startswith(("habana_frameworks", "torch_directml")):
            monkeypatch.delitem(sys.modules, name)
    return monkeypatch


def test_cpu_and_other_devices():
    assert backends.backend_for("cpu").ops.startswith("cpp")
    b = backends.backend_for("mps")
    assert b.name == "reference" and b.graphs is None


def test_directml_only_when_user_imported_it(clean_modules):
    b = backends.backend_for("privateuseone")
    assert not b.available and "not imported" in b.notes[0]
    clean_modules.setitem(sys.modules, "torch_directml", _module("torch_directml"))
    b = backends.backend_for("privateuseone")
    assert b.available and b.ops == "reference" and b.preferred_dtype == torch.float16 and not b.autocast


def _fake_habana(monkeypatch, crash_on_import=False, with_graphs=True, with_sdpa=True):
    def crash(*a, **k):
        raise AssertionError("a device query must never be called by backend selection")

    hf = _module("habana_frameworks")
    hf_torch = _module("habana_frameworks.torch")
    hpu_attrs = {"is_available": crash, "device_count": crash}
    if with_graphs:
        hpu_attrs["wrap_in_hpu_graph"] = lambda m: m
    hpu = _module("habana_frameworks.torch.hpu", **hpu_attrs)
    if crash_on_import:
        core = None
    else:
        core = _module("habana_frameworks.torch.core", mark_step=crash)
    kernels = _module("habana_frameworks.torch.hpex.kernels")
    if with_sdpa:
        kernels.FusedSDPA = types.SimpleNamespace(apply=lambda *a: "fused")
    for name, mod in [
        ("habana_frameworks", hf),
        ("habana_frameworks.torch", hf_torch),
        ("habana_frameworks.torch.hpu", hpu),
        ("habana_frameworks.torch.hpex", _module("habana_frameworks.torch.hpex")),
        ("habana_frameworks.torch.hpex.kernels", kernels),
    ]:
        monkeypatch.setitem(sys.modules, name, mod)
    if core is not None:
        monkeypatch.setitem(sys.modules, "habana_frameworks.torch.core", core)
    else:
        # None in sys.modules makes the import raise ImportError, like a broken driver install
        monkeypatch.setitem(sys.modules, "habana_frameworks.torch.core", None)


def test_hpu_backend_makes_no_graph_or_fused_sdpa_claim(clean_modules):
    """A working Habana stack, even one with wrap_in_hpu_graph and FusedSDPA, gives an available hpu backend that
    runs the reference ops without graphs: sdkern integrates neither, and the backend says what it does."""
    _fake_habana(clean_modules)
    b = backends.backend_for("hpu")
    assert b.available and b.graphs is None and b.ops == "reference"
    assert b.preferred_dtype == torch.bfloat16
    assert not hasattr(backends, "fused_sdpa_hpu") and not hasattr(b, "wrap_graph")
    assert any(x.name == "hpu" for x in backends.available_backends())


def test_backend_ops_are_the_dispatch_chains():
    """What a backend (and so ``sdkern info``) says runs on a device is the op dispatcher's chain there."""
    import sdkern
    from sdkern.ops import cuda_impl_order, set_cuda_impl
    from sdkern.ops._library import OPS, chain

    for device_type in ("cpu", "cuda", "privateuseone", "hpu", "mps"):
        names: list[str] = []  # every op's chain, merged in order
        for op in OPS:
            names += [i.name for i in chain(op, device_type) if i.name not in names]
        assert backends.backend_for(device_type).ops == " -> ".join(names)
    saved = cuda_impl_order()[0]
    try:
        set_cuda_impl("cuda")
        assert backends.backend_for("cuda").ops == "cuda -> triton -> reference"
        set_cuda_impl("triton")
        assert backends.backend_for("cuda").ops == "triton -> cuda -> reference"
    finally:
        set_cuda_impl(saved)
    report = sdkern.info(as_dict=True)
    described = {b["name"]: b for b in report["backends"]}
    assert set(described) == {"cpu", "cuda", "directml", "hpu"}
    assert described["cpu"]["ops"] == "cpp -> reference" and described["cpu"]["available"]
    assert described["cuda"]["available"] == torch.cuda.is_available()


def test_hpu_backend_import_failure_is_caught(clean_modules):
    _fake_habana(clean_modules, crash_on_import=True)
    b = backends.backend_for("hpu")
    assert not b.available and "failed to import" in b.notes[0]
    assert all(x.name != "hpu" for x in backends.available_backends())


def test_hpu_absent(clean_modules):
    b = backends.backend_for("hpu")
    assert not b.available and "not installed" in b.notes[0]


def test_cpu_selection_never_touches_vendor_stacks(clean_modules):
    _fake_habana(clean_modules)
    backends.backend_for("cpu")  # the crashing device queries would raise if called
    import sdkern

    assert "device backends" in sdkern.info()


def test_noise_is_drawn_on_cpu_and_reproducible():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = noise.randn((2, 4, 8, 8), g1, "cpu", torch.bfloat16)
    b = noise.randn((2, 4, 8, 8), g2, "meta", torch.float16)
    assert a.dtype == torch.bfloat16 and b.device.type == "meta"
    ref = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.float(), ref.bfloat16().float())
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    c = noise.randn((2, 3), gens)
    torch.testing.assert_close(c[1], torch.randn((1, 3), generator=torch.Generator().manual_seed(1))[0])
    with pytest.raises(ValueError, match="generators"):
        noise.randn((3, 3), gens)
