"""Graph runner logic on the CPU with an injectable fake graph backend (no GPU needed)."""

from __future__ import annotations

import logging

import pytest
import torch

from sdkern.runtime import graphs
from tests.utils import randn


class FakeHandle:
    """Replays by re-running the captured function and writing into the captured output buffers,
    which is what a real graph does: read static inputs, write static outputs."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        new = self.fn()
        leaves = torch.utils._pytree.tree_leaves
        for dst, src in zip(leaves(self.out), leaves(new), strict=True):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


class FakeBackend:
    name = "fake"

    def __init__(self, fail=False):
        self.fail = fail
        self.captured = 0
        self.warmups = 0
        self.released = 0

    def supports(self, device):
        return device.type == "cpu"

    def warmup(self, fn, device, iters):
        for _ in range(iters):
            fn()
            self.warmups += 1

    def release(self, device):
        self.released += 1

    def capture(self, fn, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        out = fn()
        return FakeHandle(fn, out), out


class TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, sample, timestep, encoder_hidden_states, added=None, return_dict=True):
        h = self.lin(sample) * (1 + timestep) + encoder_hidden_states.mean()
        if added is not None:
            h = h + added["text_embeds"].sum()
        return {"sample": h} if return_dict else (h,)


def _inputs(b=2, s=4):
    return randn(b, s, 8), randn(b, 3, 8)


@torch.no_grad()
def test_capture_once_then_replay_matches_eager():
    m = TinyUNet()
    eager = [m(x, t, e)["sample"] for (x, e), t in zip([_inputs() for _ in range(3)], [1.0, 0.5, 0.25], strict=False)]
    backend = FakeBackend()
    runner = graphs.enable(m, backend=backend)
    torch.manual_seed(0)
    outs = []
    for (x, e), t in zip([_inputs() for _ in range(3)], [1.0, 0.5, 0.25], strict=False):
        outs.append((x, e, t, m(x, t, e)["sample"]))
    assert backend.captured == 1 and runner.num_graphs == 1  # timesteps are tensors: one graph
    for x, e, t, got in outs:
        graphs.disable(m)
        ref = m(x, t, e)["sample"]
        graphs.enable(m, backend=backend)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert len(eager) == 3


@torch.no_grad()
def test_new_shapes_capture_new_graphs_with_lru_bound():
    m = TinyUNet()
    backend = FakeBackend()
    runner = graphs.enable(m, backend=backend, max_graphs=2)
    for b in (1, 2, 3, 1):
        x, e = _inputs(b=b)
        m(x, 0.3, e)
    # 1, 2, 3 captured; 1 was evicted by 3 and captured again
    assert backend.captured == 4
    assert runner.num_graphs == 2


@torch.no_grad()
def test_optional_inputs_are_part_of_the_signature():
    m = TinyUNet()
    backend = FakeBackend()
    graphs.enable(m, backend=backend)
    x, e = _inputs()
    m(x, 1.0, e)
    m(x, 1.0, e, added={"text_embeds": randn(2, 4)})
    m(x, 1.0, e, return_dict=False)
    assert backend.captured == 3


@torch.no_grad()
def test_in_place_weight_updates_need_no_recapture():
    m = TinyUNet()
    backend = FakeBackend()
    runner = graphs.enable(m, backend=backend)
    x, e = _inputs()
    before = m(x, 1.0, e)["sample"]
    m.lin.weight.mul_(2.0)  # LoRA fuse / load_state_dict style: same storage
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    after = m(x, 1.0, e)["sample"]
    assert backend.captured == 1 and runner.invalidations == 0
    assert not torch.equal(before, after)
    graphs.disable(m)
    torch.testing.assert_close(after, m(x, 1.0, e)["sample"], rtol=0, atol=0)


@torch.no_grad()
def test_replacing_weights_or_dtype_invalidates():
    m = TinyUNet()
    backend = FakeBackend()
    runner = graphs.enable(m, backend=backend)
    x, e = _inputs()
    m(x, 1.0, e)
    m.lin = torch.nn.Linear(8, 8)  # module replaced
    out = m(x, 1.0, e)["sample"]
    assert runner.invalidations == 1 and backend.captured == 2
    graphs.disable(m)
    torch.testing.assert_close(out, m(x, 1.0, e)["sample"], rtol=0, atol=0)
    graphs.enable(m, backend=backend)
    m(x, 1.0, e)
    m.double()  # dtype change moves the storage
    m(x.double(), 1.0, e.double())
    assert graphs.runner_of(m).invalidations == 1


@torch.no_grad()
def test_capture_failure_runs_eagerly_and_logs_once(caplog):
    m = TinyUNet()
    backend = FakeBackend(fail=True)
    runner = graphs.enable(m, backend=backend)
    x, e = _inputs()
    with caplog.at_level(logging.WARNING, logger="sdkern"):
        a = m(x, 1.0, e)["sample"]
        b = m(x, 1.0, e)["sample"]
    assert sum("capture failed" in r.message for r in caplog.records) == 1
    assert runner.eager_calls == 2 and runner.num_graphs == 0
    torch.testing.assert_close(a, b)


def test_grad_mode_and_unsupported_devices_run_eagerly():
    m = TinyUNet()

    class NoCpu(FakeBackend):
        def supports(self, device):
            return False

    backend = NoCpu()
    runner = graphs.enable(m, backend=backend)
    x, e = _inputs()
    with torch.no_grad():
        m(x, 1.0, e)
    m(x, 1.0, e)  # grad enabled
    assert backend.captured == 0 and runner.eager_calls == 2


@torch.no_grad()
def test_enable_is_idempotent_and_disable_restores_and_frees():
    m = TinyUNet()
    orig = m.forward
    backend = FakeBackend()
    r1 = graphs.enable(m, backend=backend)
    r2 = graphs.enable(m, backend=FakeBackend())
    assert r1 is r2
    m(*_inputs()[:1], 1.0, _inputs()[1])
    assert r1.num_graphs == 1
    assert graphs.disable(m) is True
    assert backend.released == 1 and r1.num_graphs == 0
    assert m.forward == orig and graphs.runner_of(m) is None
    assert graphs.disable(m) is False


def test_bad_options():
    with pytest.raises(ValueError, match="max_graphs"):
        graphs.GraphRunner(TinyUNet(), TinyUNet().forward, backend=FakeBackend(), max_graphs=0)


def _cuda():
    return torch.cuda.is_available()


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_graph_replay_matches_eager():
    m = TinyUNet().cuda()
    runner = graphs.enable(m)
    outs = []
    for t in (1.0, 0.5):
        x, e = (a.cuda() for a in _inputs())
        outs.append((x, e, t, m(x, t, e)["sample"]))
    assert runner.captures == 1
    graphs.disable(m)
    for x, e, t, got in outs:
        torch.testing.assert_close(got, m(x, t, e)["sample"])
