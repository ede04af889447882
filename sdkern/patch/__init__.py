"""``sdkern.patch(pipe)``: rewrite diffusers pipelines onto the sdkern fused ops, reversibly.

Importing this package imports diffusers (``import sdkern`` alone does not). The rules are a table
(:mod:`sdkern.patch.rules`); :mod:`sdkern.patch.core` walks it.

Why this module is callable: ``sdkern.patch`` names both the function (``sdkern.patch(pipe)``, looked up lazily
by ``sdkern.__getattr__``) and this subpackage (``from sdkern.patch import PatchConfig``, ``import sdkern.patch as
sp; sp.patch_report(...)``). Importing a subpackage makes Python bind it as an attribute of its parent, so after
any import of ``sdkern.patch`` the name ``sdkern.patch`` *is* this module, and ``import sdkern.patch as sp`` gives
that attribute. No module layout keeps all three spellings working with ``sdkern.patch`` a plain function (renaming
the subpackage would break the imports above), so the module's class is swapped for a ``ModuleType`` subclass whose
``__call__`` forwards to :func:`patch` (assigning a module's ``__class__`` is supported by Python since 3.5).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from sdkern.patch.config import PatchConfig
from sdkern.patch.core import patch, patch_report, unpatch
from sdkern.patch.report import PatchReport, ReportEntry

__all__ = ["PatchConfig", "PatchReport", "ReportEntry", "patch", "patch_report", "unpatch"]


class _CallableModule(types.ModuleType):
    """``sdkern.patch`` the module, callable as :func:`sdkern.patch.core.patch`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return patch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
