"""The tools' old import paths: ``sdkern.<tool>[.<module>]`` is ``sdkern.apps.<tool>[.<module>]``.

The tools (command line, bench, generate, serve, ONNX export, model presets) live in :mod:`sdkern.apps`, apart
from the kernel library. README, docs and user code import some of them by their earlier, shorter paths
(``sdkern.serve.deploy``, ``sdkern.onnx.OrtStableDiffusionPipeline``, ``from sdkern.models import build``, the
``sdkern.cli:main`` console script of an existing install, ``python -m sdkern.cli``). A finder on
``sys.meta_path`` answers those names with the module objects of ``sdkern.apps`` themselves -- one module per
file, never a second copy, so ``monkeypatch`` / ``mock.patch`` on either path patch the same namespace --
and nothing is imported before such a name is asked for (``import sdkern`` stays light).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

#: First-level names under ``sdkern`` that are tools, moved to ``sdkern.apps``.
MOVED: frozenset[str] = frozenset({"bench", "cli", "generate", "imageio", "models", "onnx", "serve", "video"})


def target_of(fullname: str) -> str | None:
    """The ``sdkern.apps`` module an old name stands for, or None when ``fullname`` is not an alias."""
    parts = fullname.split(".")
    if len(parts) >= 2 and parts[0] == "sdkern" and parts[1] in MOVED:
        return ".".join(["sdkern", "apps", *parts[1:]])
    return None


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``sdkern.<tool>...`` and loads it as the already-imported ``sdkern.apps.<tool>...`` module."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None) -> object:
        real = target_of(fullname)
        if real is None:
            return None
        real_spec = importlib.util.find_spec(real)
        if real_spec is None:
            return None
        is_package = real_spec.submodule_search_locations is not None
        # the real file as origin: ``python -m sdkern.cli`` sets sys.argv[0] from it (Ray's driver realpath()s it)
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=real_spec.origin, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = list(real_spec.submodule_search_locations)
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(target_of(spec.name) or spec.name)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's: put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        alias = module.__spec__.name if module.__spec__ is not None else None
        real_spec = module.__spec__.loader_state if module.__spec__ is not None else None
        if real_spec is not None:
            module.__spec__ = real_spec
            # submodules the package already imported answer by their old names too (``sys.modules[...]`` lookups)
            prefix = real_spec.name + "."
            for name in [n for n in sys.modules if n.startswith(prefix)]:
                sys.modules.setdefault(f"{alias}.{name[len(prefix) :]}", sys.modules[name])

    # runpy (``python -m sdkern.cli``) asks the loader for code rather than importing the module.
    def get_code(self, fullname: str) -> CodeType | None:
        real = target_of(fullname) or fullname
        spec = importlib.util.find_spec(real)
        loader = spec.loader if spec is not None else None
        return loader.get_code(real) if loader is not None and hasattr(loader, "get_code") else None

    def is_package(self, fullname: str) -> bool:
        spec = importlib.util.find_spec(target_of(fullname) or fullname)
        return spec is not None and spec.submodule_search_locations is not None


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
