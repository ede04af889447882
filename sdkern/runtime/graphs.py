"""Graph capture and replay of a module method (U-Net forward, VAE decode, text encoder).

A :class:`GraphRunner` replaces ``module.<method>``. Per *input signature* (the tree structure of the
arguments, each tensor's shape/dtype/device, every non-tensor value) it warms the method up,
captures it once into a graph with static input and output buffers, and afterwards replays: new
inputs are copied into the static buffers, the graph is replayed, outputs are returned (cloned by
default, so a later replay cannot overwrite what the caller holds).

- Python numbers passed for arguments named in ``tensorize`` (default: ``timestep``) are turned into
  0-d device tensors, so a new timestep is a copy into a static buffer, not a new graph.
- Bounded LRU cache of graphs (``max_graphs``); a new resolution or batch captures a new graph.
- Weights updated in place (LoRA fuse/unfuse, ``load_state_dict`` with the same shapes) keep their
  storage, so graphs stay valid. Replacing a parameter or module, or changing dtype/device, changes
  the weights key and drops every graph.
- If capture fails, that signature runs eagerly from then on, and it is logged once.
- Where the backend cannot capture (CPU tensors), the method simply runs eagerly.

The graph mechanism is injectable (:class:`GraphBackend`), so the runner's logic is tested on the
CPU with a fake backend.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree

logger = logging.getLogger("sdkern")


class GraphHandle(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """How graphs are captured on a device type."""

    name: str

    def supports(self, device: torch.device) -> bool: ...

    def warmup(self, fn: Callable[[], Any], device: torch.device, iters: int) -> None: ...

    def capture(self, fn: Callable[[], Any], device: torch.device) -> tuple[GraphHandle, Any]: ...

    def release(self, device: torch.device) -> None: ...


class CudaGraphBackend:
    """torch.cuda.CUDAGraph with one memory pool shared by every graph on a device."""

    name = "cuda"

    def __init__(self) -> None:
        self._pools: dict[int, Any] = {}

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _pool(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._pools:
            self._pools[idx] = torch.cuda.graph_pool_handle()
        return self._pools[idx]

    def warmup(self, fn: Callable[[], Any], device: torch.device, iters: int) -> None:
        # Warm up on a side stream (what capture requires: lazy init, autotuning, JIT compiles).
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(iters):
                fn()
        main.wait_stream(side)

    def capture(self, fn: Callable[[], Any], device: torch.device) -> tuple[GraphHandle, Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool(device)):
            out = fn()
        return graph, out

    def release(self, device: torch.device) -> None:
        idx = device.index if device.index is not None else 0
        self._pools.pop(idx, None)
        torch.cuda.empty_cache()


_DEFAULT_BACKEND: GraphBackend | None = None


def default_backend() -> GraphBackend:
    global _DEFAULT_BACKEND
    if _DEFAULT_BACKEND is None:
        _DEFAULT_BACKEND = CudaGraphBackend()
    return _DEFAULT_BACKEND


@dataclass
class _Entry:
    handle: GraphHandle | None  # None: this signature runs eagerly (capture failed)
    static_in: list[torch.Tensor]
    static_out: list[Any]
    out_spec: Any
    replays: int = 0


def _leaf_key(x: Any) -> Hashable:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device, x.requires_grad)
    try:
        hash(x)
        return ("V", type(x).__name__, x)
    except TypeError:
        return ("R", type(x).__name__, repr(x))


class CallHooks(Protocol):
    """Per-call hooks run outside the graph (e.g. DeepCache's step counter and mode)."""

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        """Called first on every call; the returned value is part of the graph signature."""
        ...

    def after(self) -> None: ...


class GraphRunner:
    """Callable that replaces a module method with graph capture/replay.

    Parameters
    ----------
    module : torch.nn.Module
        Owner of the method; its parameters and buffers define the weights key.
    fn : callable
        The original bound method.
    backend : GraphBackend, optional
        Capture mechanism (default: CUDA graphs).
    max_graphs : int
        LRU bound on captured signatures.
    warmup : int
        Eager runs before capture.
    tensorize : tuple of str
        Argument names whose Python numbers become 0-d tensors on the inputs' device.
    clone_outputs : bool
        Return clones of the static outputs (safe) instead of the buffers themselves.

    Attributes
    ----------
    hooks : CallHooks or None
        Run outside the graph on every call; their key selects among graphs.
    """

    hooks: CallHooks | None = None

    def __init__(
        self,
        module: torch.nn.Module,
        fn: Callable[..., Any],
        *,
        backend: GraphBackend | None = None,
        max_graphs: int = 8,
        warmup: int = 2,
        tensorize: tuple[str, ...] = ("timestep",),
        clone_outputs: bool = True,
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.module = module
        self.fn = fn
        self.backend = backend if backend is not None else default_backend()
        self.max_graphs = max_graphs
        self.warmup_iters = warmup
        self.tensorize = tensorize
        self.clone_outputs = clone_outputs
        self._sig = inspect.signature(fn)
        self._graphs: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._weights_key: tuple[Any, ...] | None = None
        self._devices: set[torch.device] = set()
        self.captures = 0
        self.invalidations = 0
        self.eager_calls = 0

    # ---- bookkeeping -------------------------------------------------------------------------
    def _current_weights_key(self) -> tuple[Any, ...]:
        return tuple(
            (t.data_ptr(), t.dtype, t.device, tuple(t.shape))
            for t in (*self.module.parameters(), *self.module.buffers())
        )

    @property
    def num_graphs(self) -> int:
        return sum(1 for e in self._graphs.values() if e.handle is not None)

    def invalidate(self, reason: str = "") -> None:
        """Drop every captured graph (they are recaptured on demand)."""
        if self._graphs:
            self.invalidations += 1
            logger.info("sdkern graphs: dropping %d graph(s)%s", len(self._graphs), f" ({reason})" if reason else "")
        self._graphs.clear()

    def free(self) -> None:
        """Drop the graphs and give the memory pools back."""
        self._graphs.clear()
        for dev in self._devices:
            if self.backend.supports(dev):
                self.backend.release(dev)
        self._devices.clear()

    def _normalise(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self.tensorize:
            return args, kwargs
        bound = self._sig.bind_partial(*args, **kwargs)
        device = next(
            (a.device for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)),
            None,
        )
        changed = False
        for name in self.tensorize:
            val = bound.arguments.get(name)
            if device is not None and isinstance(val, (int, float)) and not isinstance(val, bool):
                bound.arguments[name] = torch.tensor(val, device=device)
                changed = True
            elif isinstance(val, torch.Tensor) and val.dim() == 0 and device is not None and val.device != device:
                bound.arguments[name] = val.to(device)
                changed = True
        return (tuple(bound.args), dict(bound.kwargs)) if changed else (args, kwargs)

    # ---- call --------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hooks = self.hooks
        extra = hooks.before(args, kwargs) if hooks is not None else None
        try:
            return self._call(extra, args, kwargs)
        finally:
            if hooks is not None:
                hooks.after()

    def _call(self, extra: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args, kwargs = self._normalise(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        device = tensors[0].device if tensors else None
        if device is None or not self.backend.supports(device) or torch.is_grad_enabled():
            self.eager_calls += 1
            return self.fn(*args, **kwargs)

        wkey = self._current_weights_key()
        if wkey != self._weights_key:
            if self._weights_key is not None:
                self.invalidate("weights were replaced or changed dtype/device")
            self._weights_key = wkey

        key = (extra, str(spec), tuple(_leaf_key(x) for x in leaves))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, leaves, spec, device)
        else:
            self._graphs.move_to_end(key)
        if entry.handle is None:
            self.eager_calls += 1
            return self.fn(*args, **kwargs)

        for dst, src in zip(entry.static_in, tensors, strict=True):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        entry.handle.replay()
        entry.replays += 1
        outs = [o.clone() if self.clone_outputs and isinstance(o, torch.Tensor) else o for o in entry.static_out]
        return pytree.tree_unflatten(outs, entry.out_spec)

    def _capture(self, key: Hashable, leaves: list[Any], spec: Any, device: torch.device) -> _Entry:
        static_leaves = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_in = [x for x in static_leaves if isinstance(x, torch.Tensor)]
        s_args, s_kwargs = pytree.tree_unflatten(static_leaves, spec)

        def run() -> Any:
            return self.fn(*s_args, **s_kwargs)

        try:
            self.backend.warmup(run, device, self.warmup_iters)
            handle, out = self.backend.capture(run, device)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this signature eagerly
            logger.warning(
                "sdkern graphs: capture failed for %s on %s, running it eagerly (%s: %s)",
                type(self.module).__name__,
                device,
                type(e).__name__,
                e,
            )
            entry = _Entry(None, [], [], None)
        else:
            out_leaves, out_spec = pytree.tree_flatten(out)
            entry = _Entry(handle, static_in, out_leaves, out_spec)
            self.captures += 1
            self._devices.add(device)
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry


def enable(
    module: torch.nn.Module,
    method: str = "forward",
    **options: Any,
) -> GraphRunner:
    """Route ``module.<method>`` through a :class:`GraphRunner` (idempotent). Returns the runner."""
    current = module.__dict__.get(method)
    if isinstance(current, GraphRunner):
        return current
    runner = GraphRunner(module, getattr(module, method), **options)
    setattr(module, method, runner)
    deepcache = getattr(module, "_sdkern_deepcache", None)
    if deepcache is not None and method == "forward":
        deepcache.attach(runner)
    return runner


def disable(module: torch.nn.Module, method: str = "forward") -> bool:
    """Restore ``module.<method>`` and free its graphs. Returns whether a runner was removed."""
    current = module.__dict__.get(method)
    if not isinstance(current, GraphRunner):
        return False
    current.free()
    delattr(module, method)
    deepcache = getattr(module, "_sdkern_deepcache", None)
    if deepcache is not None and method == "forward":
        deepcache.detach(current)
    return True


def runner_of(module: torch.nn.Module, method: str = "forward") -> GraphRunner | None:
    current = module.__dict__.get(method)
    return current if isinstance(current, GraphRunner) else None
