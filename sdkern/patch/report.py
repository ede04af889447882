"""The patch report: what :func:`sdkern.patch` rewrote (rule and what it fuses) and what it left alone (and why).

Every entry is made by a rule of the table in :mod:`sdkern.patch.rules`: its ``rule`` field is that rule's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdkern.patch.config import PatchConfig

__all__ = ["PatchReport", "ReportEntry"]


@dataclass
class ReportEntry:
    """One module the patcher looked at.

    Attributes
    ----------
    name : str
        Qualified module name (pipeline component first, e.g. ``"unet.down_blocks.0.resnets.1"``).
    module : str
        The module's class name: for a rewritten module, the class the rewrite gave it (e.g.
        ``SdkernResnetBlock2D``; ``Attention`` keeps its class and gets a processor), else its own.
    rule : str
        The name of the rule (:data:`sdkern.patch.rules.PHASES`) that rewrote the module (``"resnet"``,
        ``"attention"``, ``"geglu"``, ``"transformer_block"``, ``"conv_norm_out"``, ``"group_norm"``, ``"layer_norm"``,
        ``"clip_layer"``, ``"channels_last"``, ``"cpu_conv"``, ...) or left it alone; ``"cpu_engine"`` when the whole
        CPU-engine phase could not run.
    detail : str
        What was fused, or why the module was left as it is.
    """

    name: str
    module: str
    rule: str
    detail: str


@dataclass
class PatchReport:
    """What :func:`sdkern.patch` changed and what it left alone.

    Attributes
    ----------
    config : PatchConfig
        The configuration used.
    rewritten : list of ReportEntry
        Modules rewritten onto fused ops, each with its rule and what it fuses.
    left : list of ReportEntry
        Modules of interest that stay as they are, each with the reason.
    """

    config: PatchConfig
    rewritten: list[ReportEntry] = field(default_factory=list)
    left: list[ReportEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of rewritten modules per rule."""
        out: dict[str, int] = {}
        for e in self.rewritten:
            out[e.rule] = out.get(e.rule, 0) + 1
        return out

    def extend(self, other: PatchReport) -> None:
        """Append another report's entries (used for pipelines)."""
        self.rewritten.extend(other.rewritten)
        self.left.extend(other.left)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "backend": self.config.backend,
            "counts": self.counts(),
            "rewritten": [vars(e) for e in self.rewritten],
            "left": [vars(e) for e in self.left],
        }

    def __str__(self) -> str:
        lines = [f"sdkern.patch report (backend={self.config.backend})"]
        lines.append("rewritten: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items())))
        reasons: dict[tuple[str, str], int] = {}
        for e in self.left:
            reasons[(e.module, e.detail)] = reasons.get((e.module, e.detail), 0) + 1
        lines.append(f"left alone: {len(self.left)}")
        lines.extend(f"  {n} x {mod}: {why}" for (mod, why), n in sorted(reasons.items()))
        return "\n".join(lines)
