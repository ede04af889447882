"""The rule-table machinery of :func:`sdkern.patch`: :class:`Rule`, :class:`Phase`, and what a rule is handed.

A :class:`Rule` names one rewrite (``"resnet"``, ``"attention"``, ``"cpu_conv"``, ...): which modules it is for
(``matches``), the :class:`PatchConfig` switches that turn it on (``flags``), and ``rewrite``, which either rewrites
the module and returns the function that undoes exactly that, or reports why the module stays as it is. Rules are
grouped into :class:`Phase` s run in order over the module tree (the table is :data:`sdkern.patch.rules.PHASES`);
in each phase every module goes to the first rule that matches it. Every report entry is written through the
:class:`Site` a rule is handed, so the report's rule names are the table's.

This module imports only torch and the config/report types, so the rule modules and the module families
(:mod:`sdkern.patch.svd`, ...) can share its helpers without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from sdkern.patch.config import PatchConfig
from sdkern.patch.report import PatchReport, ReportEntry

__all__ = [
    "Context",
    "Phase",
    "Rule",
    "Site",
    "Undo",
    "affine_group_norm",
    "affine_layer_norm",
    "undo_all",
]

Undo = Callable[[], None]


def affine_group_norm(m: Any) -> bool:
    """``m`` is a plain ``nn.GroupNorm`` with affine parameters (what the fused group norms take)."""
    return type(m) is nn.GroupNorm and m.affine


def affine_layer_norm(m: Any) -> bool:
    """``m`` is a plain ``nn.LayerNorm`` with an affine weight over the last dimension only."""
    return type(m) is nn.LayerNorm and m.elementwise_affine and m.weight is not None and len(m.normalized_shape) == 1


def undo_all(undos: Iterable[Undo]) -> Undo:
    """One undo running ``undos`` last first (the order a flat undo list would run them in)."""
    fns = list(undos)

    def undo() -> None:
        for fn in reversed(fns):
            fn()

    return undo


@dataclass(frozen=True)
class Rule:
    """One rewrite of the patcher.

    Attributes
    ----------
    name : str
        The rule's name in the patch report (several rules may share one: diffusers' and CLIP's attention are both
        ``"attention"``).
    matches : type, tuple of types, or callable
        The modules the rule is for: a module whose type *is* one of the types (subclasses are other modules), or
        for which ``matches(site)`` is True. In a phase, a module goes to the first rule that matches it.
    rewrite : callable
        ``rewrite(site) -> undo or None``: rewrites ``site.module`` (reporting it with :meth:`Site.done`) and
        returns the function that restores it exactly, or reports why not (:meth:`Site.left`) and returns None.
    flags : tuple of str
        :class:`PatchConfig` fields that enable the rule (any of them True). Empty: always on.
    when_off : {"report", "pass", "rule"}
        With every flag off: ``"report"`` leaves the module alone with the reason ``"<flags> fusion disabled"``;
        ``"pass"`` makes the rule not match (a later rule may take the module); ``"rule"`` leaves the check to
        ``rewrite`` (:meth:`Site.disabled`), for a rule that reports structural problems first.
    """

    name: str
    matches: type | tuple[type, ...] | Callable[[Site], bool]
    rewrite: Callable[[Site], Undo | None]
    flags: tuple[str, ...] = ()
    when_off: Literal["report", "pass", "rule"] = "report"

    def enabled(self, cfg: PatchConfig) -> bool:
        """Whether one of the rule's flags is on in ``cfg`` (True for a rule without flags)."""
        return not self.flags or any(getattr(cfg, f) for f in self.flags)

    def disabled_reason(self) -> str:
        """The report's reason for a module this rule leaves alone because its flags are off."""
        return " and ".join(self.flags) + (" fusion disabled" if len(self.flags) == 1 else " fusions disabled")

    def claims(self, site: Site) -> bool:
        """Whether the rule takes ``site.module`` (its type or predicate, and its flags for ``when_off="pass"``)."""
        if self.when_off == "pass" and not self.enabled(site.ctx.cfg):
            return False
        m, t = self.matches, type(site.module)
        if isinstance(m, tuple):
            return t in m
        if isinstance(m, type):
            return t is m
        return m(site)


@dataclass(frozen=True)
class Phase:
    """An ordered group of rules, run over the whole module tree (or only its root) before the next phase.

    Attributes
    ----------
    name : str
        The phase's name; a phase whose ``prepare`` gives a reason is reported left alone under it.
    rules : tuple of Rule
        First match wins.
    root_only : bool
        Offer only the root module (model-wide rewrites: dtype, weight layout).
    applies : callable
        ``applies(ctx)``: whether the phase runs for this model at all.
    prepare : callable or None
        ``prepare(root, ctx) -> reason or None``, run before the phase: a reason skips the phase.
    """

    name: str
    rules: tuple[Rule, ...]
    root_only: bool = False
    applies: Callable[[Context], bool] = lambda ctx: True
    prepare: Callable[[nn.Module, Context], str | None] | None = None


@dataclass
class Context:
    """The state of patching one module tree, shared by its rules.

    Attributes
    ----------
    cfg : PatchConfig
    prefix : str
        Name of the tree in the report (the pipeline component, e.g. ``"unet"``; empty for a bare module).
    report : PatchReport
        Appended to by the rules.
    device_type : str
        Device type of the tree's first parameter (``"cpu"`` for a tree without parameters).
    dtype : torch.dtype
        Its floating dtype; ``PatchConfig.dtype`` once the dtype phase converted the tree.
    amx : callable
        Probe for AMX tiles (asked at most once, only where bf16 attention on the CPU engine depends on it).
    avx512 : callable
        Probe for AVX-512 (asked at most once, only where fp32 attention on the CPU engine depends on it).
    consumed : set of int
        ids of norm modules folded into a block's rewrite: no later rule sees them.
    packed_qkv : set of int
        ids of Linears whose weights are views of a packed QKV/KV weight (the engine phase leaves them).
    geglu_proj : set of int
        ids of the ``proj`` Linears of patched GEGLUs (the engine packs them as two GEMMs, value and gate).
    """

    cfg: PatchConfig
    prefix: str
    report: PatchReport
    device_type: str
    dtype: torch.dtype
    amx: Callable[[], bool] = lambda: False
    consumed: set[int] = field(default_factory=set)
    packed_qkv: set[int] = field(default_factory=set)
    geglu_proj: set[int] = field(default_factory=set)
    avx512: Callable[[], bool] = lambda: True
    _amx: bool | None = field(default=None, init=False, repr=False)  # the probe's answer, once asked
    _avx512: bool | None = field(default=None, init=False, repr=False)

    @property
    def backend(self) -> str:
        """``PatchConfig.backend`` (stored on every rewritten module as ``_sdkern_backend``)."""
        return self.cfg.backend

    @property
    def engine(self) -> bool:
        """Whether the CPU engine runs this tree's convolutions and GEMMs."""
        return self.cfg.use_cpu_engine(self.device_type, self.dtype)

    @property
    def attn_sdpa(self) -> bool:
        """bf16 attention on a CPU with AMX: the patched attention calls PyTorch's SDPA.

        PyTorch's flash attention runs its GEMMs on AMX tiles and is 2.5-3x faster than ``sdkern::attention``'s
        AVX-512-BF16 kernel on SD self-attention (benchmarks/results/cpu_engine_session6.md); the projections
        stay packed/fused.
        """
        if not (self.engine and self.dtype == torch.bfloat16):
            return False
        if self._amx is None:
            self._amx = bool(self.amx())
        return self._amx

    @property
    def diffusers_attn_sdpa(self) -> str | None:
        """Why the patched diffusers attention (U-Net, VAE) calls PyTorch's SDPA, or None when it runs
        ``sdkern::attention``.

        bf16 with AMX (:attr:`attn_sdpa`); and fp32 on the CPU engine without AVX-512, where PyTorch's flash
        attention (MKL GEMMs) beats ``sdkern::attention``'s AVX2 kernel at SD's shapes: self-attention 1.05-1.44x
        (S 64-4096, head_dim 40-160), the VAE's single 512-wide head 1.5-1.9x, cross-attention 0.88-1.13x
        (benchmarks/results/cpu_engine_session14.md). CLIP's 77-token causal attention is not included:
        ``sdkern::attention`` is 1.3-1.5x SDPA there.
        """
        if self.attn_sdpa:
            return "AMX bf16"
        if not (self.engine and self.dtype == torch.float32):
            return None
        if self._avx512 is None:
            self._avx512 = bool(self.avx512())
        return None if self._avx512 else "fp32 without AVX-512"

    @property
    def qkv_fusion(self) -> bool:
        """``PatchConfig.qkv_fusion``, except bf16 on the CPU engine.

        There q/k/v stay separate Linears, each prepacked by the engine: a fused QKV weight would run as a dense
        ``F.linear`` that reorders its weight on every call (oneDNN bf16), and three prepacked GEMMs were 1.2-1.7x
        faster on SD shapes (1-thread probe, session 7). fp32 goes through MKL either way (equal times), so there
        the packed QKV stays.
        """
        return self.cfg.qkv_fusion and not (self.engine and self.dtype == torch.bfloat16)

    def qual(self, name: str) -> str:
        """``name`` (relative to the tree) qualified with the tree's prefix."""
        return ".".join(p for p in (self.prefix, name) if p)

    def add(self, rewritten: bool, name: str, module: nn.Module, rule: str, detail: str) -> None:
        """Append a report entry (``rewritten`` or left alone) for ``module`` at ``name`` (relative)."""
        entry = ReportEntry(self.qual(name), type(module).__name__, rule, detail)
        (self.report.rewritten if rewritten else self.report.left).append(entry)


@dataclass
class Site:
    """One module offered to the rules: where it is, and the report/undo helpers a rule uses.

    Attributes
    ----------
    ctx : Context
    name : str
        Module name relative to the tree (``""`` for the root).
    module : nn.Module
    rule : Rule or None
        The rule that took the module (set by the walker before ``rewrite``).
    root : bool
        A root-only phase's site: reported as the tree's prefix, or ``"<root>"`` for a bare module.
    """

    ctx: Context
    name: str
    module: nn.Module
    rule: Rule | None = None
    root: bool = False

    def _where(self, at: str | None) -> tuple[str, nn.Module]:
        if at is None:
            return self.name, self.module
        return ".".join(p for p in (self.name, at) if p), getattr(self.module, at)

    def _entry(self, rewritten: bool, detail: str, at: str | None, rule: str | None) -> None:
        assert self.rule is not None
        name, module = self._where(at)
        rule = rule or self.rule.name
        if self.root:
            entry = ReportEntry(self.ctx.prefix or "<root>", type(module).__name__, rule, detail)
            (self.ctx.report.rewritten if rewritten else self.ctx.report.left).append(entry)
        else:
            self.ctx.add(rewritten, name, module, rule, detail)

    def done(self, detail: str, *, at: str | None = None) -> None:
        """Report the module (or its child ``at``) rewritten by this rule: ``detail`` says what is fused."""
        self._entry(True, detail, at, None)

    def left(self, reason: str, *, at: str | None = None, rule: str | None = None) -> None:
        """Report the module (or its child ``at``) left alone by this rule (or under ``rule``), with the reason."""
        self._entry(False, reason, at, rule)

    def disabled(self) -> str | None:
        """The "fusion disabled" reason when the rule's flags are all off, else None."""
        assert self.rule is not None
        return None if self.rule.enabled(self.ctx.cfg) else self.rule.disabled_reason()

    def consume(self, *modules: nn.Module | None) -> None:
        """Mark norm modules as folded into this rewrite (no later rule is offered them)."""
        self.ctx.consumed.update(id(m) for m in modules if m is not None)

    def swap_unless(
        self, why: str | None, cls: type, detail: str, *, consume: Iterable[nn.Module | None] = (), **attrs: Any
    ) -> Undo | None:
        """The usual rule body: leave the module alone for ``why`` (a problem, or None), else :meth:`swap` it to
        ``cls`` (reported with ``detail``) and mark the norms it folds in as consumed."""
        if why is not None:
            return self.left(why)
        self.consume(*consume)
        return self.swap(cls, detail, **attrs)

    def swap(self, cls: type, detail: str | None = None, *, module: nn.Module | None = None, **attrs: Any) -> Undo:
        """Swap the class of the module (or ``module``) to ``cls``, a subclass with the fused ``forward``.

        The instance attributes ``_sdkern_backend`` (the config's backend) and ``attrs`` are set on it. With
        ``detail``, the rewrite is reported. Returns the undo (original class, attributes removed).
        """
        m = self.module if module is None else module
        orig = type(m)
        m.__class__ = cls
        m.__dict__["_sdkern_backend"] = self.ctx.backend
        for k, v in attrs.items():
            m.__dict__[k] = v
        if detail is not None:
            self.done(detail)

        def restore() -> None:
            m.__class__ = orig
            for k in ("_sdkern_backend", *attrs):
                m.__dict__.pop(k, None)

        return restore
