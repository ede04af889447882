"""``sdkern.patch(pipe)``: rewrite diffusers pipelines onto the sdkern fused ops, reversibly.

Importing this package imports diffusers (``import sdkern`` alone does not).

Importing the subpackage ``sdkern.patch`` rebinds the attribute ``sdkern.patch`` from the function to
this module (Python's import system does that); the module is therefore callable and forwards to
:func:`patch`, so ``sdkern.patch(pipe)`` works before and after ``import sdkern.patch``.
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
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return patch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
