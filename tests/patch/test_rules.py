"""The rule table of sdkern.patch (sdkern/patch/rule.py, sdkern/patch/rules/) and the scoped backend preference
(sdkern/patch/preference.py)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

import sdkern
import sdkern.ops
from sdkern.patch import core
from sdkern.patch.rule import Phase, Rule, Site
from sdkern.patch.rules import PHASES, rules
from tests.patch import models as M


@pytest.fixture
def cuda_order():
    """Start from the default CUDA order ("triton" first) and put the session's order back afterwards."""
    before = sdkern.ops.cuda_impl_order()
    sdkern.ops.set_cuda_impl("triton")
    yield
    assert sdkern.ops.cuda_impl_order() == ["triton", "cuda"], "a test left a scoped preference behind"
    sdkern.ops.set_cuda_impl(before[0])


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()


class _Probe(nn.Module):
    """Records the CUDA implementation order the dispatcher sees inside the model's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(sdkern.ops.cuda_impl_order()[0])
        if self.fail:
            raise RuntimeError("probe failure")
        return x


def _probed(net: nn.Module) -> tuple[nn.Module, _Probe]:
    probe = _Probe()
    return nn.Sequential(net, probe), probe


def _run(model: nn.Module) -> None:
    with torch.no_grad():
        model(torch.randn(1, 4, 5, 5))


def test_backend_preference_is_the_patched_models_own(cuda_order):
    (a, pa), (b, pb) = _probed(_net()), _probed(_net())
    sdkern.patch(a, backend="cuda")
    sdkern.patch(b, backend="triton")
    sdkern.patch(a, backend="triton")  # already patched: a no-op, a keeps "cuda"
    _run(a), _run(b), _run(a)
    assert pa.seen == ["cuda", "cuda"] and pb.seen == ["triton"]  # each model its own, both patched at once
    assert sdkern.ops.cuda_impl_order() == ["triton", "cuda"]  # outside the models: the process-wide order

    sdkern.ops.set_cuda_impl("cuda")  # the process-wide choice changes nothing inside a scoped model ...
    _run(b)
    assert pb.seen[-1] == "triton"
    sdkern.ops.set_cuda_impl("triton")

    sdkern.unpatch(a)  # ... and unpatch removes only that model's scope
    _run(a), _run(b)
    assert pa.seen[-1] == "triton" and pb.seen[-1] == "triton"
    sdkern.ops.set_cuda_impl("cuda")
    _run(a), _run(b)
    assert pa.seen[-1] == "cuda" and pb.seen[-1] == "triton"  # a follows the process again, b keeps its own
    sdkern.ops.set_cuda_impl("triton")
    sdkern.unpatch(b)
    sdkern.unpatch(b)  # unpatching twice is harmless
    assert sdkern.ops.cuda_impl_order() == ["triton", "cuda"]

    # a forward that raises leaves no preference behind
    sdkern.patch(a, backend="cuda")
    pa.fail = True
    with pytest.raises(RuntimeError, match="probe failure"):
        _run(a)
    assert pa.seen[-1] == "cuda" and sdkern.ops.cuda_impl_order() == ["triton", "cuda"]
    pa.fail = False
    sdkern.unpatch(a)

    # backends without a CUDA preference add no scope
    for backend in ("auto", "cpu", "reference"):
        sdkern.patch(a, backend=backend)
        sdkern.ops.set_cuda_impl("cuda")
        _run(a)
        sdkern.ops.set_cuda_impl("triton")
        assert pa.seen[-1] == "cuda", backend
        sdkern.unpatch(a)


def test_backend_preference_is_per_thread(cuda_order):
    """Two threads running two models patched with different backends each see their own model's preference."""
    import threading

    (a, pa), (b, pb) = _probed(_net()), _probed(_net())
    sdkern.patch(a, backend="cuda")
    sdkern.patch(b, backend="triton")
    barrier = threading.Barrier(2)

    def loop(model: nn.Module) -> None:
        for _ in range(20):
            barrier.wait()
            _run(model)

    threads = [threading.Thread(target=loop, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pa.seen == ["cuda"] * 20 and pb.seen == ["triton"] * 20
    sdkern.unpatch(a), sdkern.unpatch(b)


def test_backend_preference_of_a_pipeline_scopes_its_components(cuda_order):
    from sdkern import models

    pipe = models.build("tiny")
    seen: list[str] = []
    handle = pipe.unet.register_forward_hook(lambda *_: seen.append(sdkern.ops.cuda_impl_order()[0]))
    sdkern.patch(pipe, backend="cuda")
    assert sdkern.ops.cuda_impl_order()[0] == "triton"  # outside the components' calls
    pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert seen and set(seen) == {"cuda"}
    sdkern.unpatch(pipe)
    pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert seen[-1] == "triton"
    handle.remove()


def test_cpu_and_cuda_preferences_run_the_cpu_kernels_like_auto(cuda_order, caplog):
    """On a CPU model "cpu", "triton" and "cuda" dispatch as "auto" does: same rewrites, same output bits."""
    net = _net()
    x = torch.randn(2, 4, 6, 5)
    outs, reports = {}, {}
    for backend in ("auto", "cpu", "triton", "cuda"):
        reports[backend] = sdkern.patch(net, backend=backend, report=True)
        with torch.no_grad():
            outs[backend] = net(x)
        sdkern.unpatch(net)
    for backend in ("cpu", "triton", "cuda"):
        assert torch.equal(outs[backend], outs["auto"]), backend
        assert reports[backend].rewritten == reports["auto"].rewritten, backend
    # "cpu" on a model that is not on the CPU names nothing: a warning, and the dispatch of "auto"
    meta = _net().to("meta")
    with caplog.at_level(logging.WARNING, logger="sdkern"):
        report = sdkern.patch(meta, backend="cpu", report=True)
    assert "backend='cpu' on a meta model" in caplog.text
    assert report.counts() == {"group_norm": 1}
    sdkern.unpatch(meta)


def test_report_rule_names_come_from_the_table():
    names = {r.name for r in rules()} | {p.name for p in PHASES}
    fields = {f.name for f in dataclasses.fields(sdkern.PatchConfig)}
    assert all(f in fields for r in rules() for f in r.flags)
    model = M.unet(M.TINY_UNET)
    for cfg in ({}, {"skip_layer_norm": False, "bias_add": False, "geglu": False, "group_norm": False}):
        report = sdkern.patch(model, report=True, **cfg)
        sdkern.unpatch(model)
        used = {e.rule for e in report.rewritten + report.left}
        # "bias_add" is the transformer_block rule's note on a feed-forward it cannot fuse
        assert used <= names | {"bias_add"}, used - names
        if cfg:  # the switched-off rules report the modules they leave
            assert {"geglu", "resnet", "transformer_block"} <= {e.rule for e in report.left}
        else:
            assert {"resnet", "attention", "transformer_block", "cpu_conv"} <= used
    assert Rule("x", nn.Linear, lambda s: None, flags=("group_norm",)).disabled_reason() == "group_norm fusion disabled"
    two = Rule("x", nn.Linear, lambda s: None, flags=("skip_layer_norm", "bias_add"))
    assert two.disabled_reason() == "skip_layer_norm and bias_add fusions disabled"


def test_walker_first_match_flags_and_undo(monkeypatch):
    """The walker with a table of its own: first matching rule wins, switched-off rules report or pass, undos run."""
    calls: list[str] = []

    def rewrite(tag: str):
        def fn(site: Site):
            site.done(f"by {tag}")
            calls.append(f"{tag}:{site.name}")
            return lambda: calls.append(f"undo {tag}:{site.name}")

        return fn

    def refuse(site: Site) -> None:
        site.left("not this one")

    table = (
        Phase(
            "p",
            (
                Rule("off_pass", nn.Linear, rewrite("off_pass"), flags=("winograd",), when_off="pass"),
                Rule("first", nn.Linear, rewrite("first")),
                Rule("second", nn.Linear, rewrite("second")),
                Rule("off_report", nn.Conv2d, rewrite("off_report"), flags=("geglu",)),
                Rule("refuse", lambda site: isinstance(site.module, nn.ReLU), refuse),
            ),
        ),
        Phase("never", (Rule("all", lambda site: True, rewrite("never")),), applies=lambda ctx: False),
        Phase("skipped", (Rule("all", lambda site: True, rewrite("skipped")),), prepare=lambda root, ctx: "no (test)"),
    )
    monkeypatch.setattr(core, "PHASES", table)
    net = nn.Sequential(nn.Linear(2, 2), nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Linear(2, 2))
    report = sdkern.patch(net, report=True, geglu=False)
    assert calls == ["first:0", "first:3"]
    assert [(e.name, e.rule, e.detail) for e in report.rewritten] == [
        ("0", "first", "by first"),
        ("3", "first", "by first"),
    ]
    assert [(e.name, e.rule, e.detail) for e in report.left] == [
        ("1", "off_report", "geglu fusion disabled"),
        ("2", "refuse", "not this one"),
        ("", "skipped", "no (test)"),
    ]
    sdkern.unpatch(net)
    assert calls[2:] == ["undo first:3", "undo first:0"]
    calls.clear()
    sdkern.patch(net, winograd=True)
    assert calls == ["off_pass:0", "off_report:1", "off_pass:3"]
    sdkern.unpatch(net)
