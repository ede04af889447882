"""sitecustomize for .ci/sanitizers.sh: import sdkern from the sources with the sanitized native modules.

Copied as ``sitecustomize.py`` next to a ``native/`` folder holding the sanitized ``_C*.so`` and
``libsdkern_ort.so``; that folder goes first on PYTHONPATH. The package ``sdkern`` is then loaded from
$SDKERN_SOURCE_DIR/sdkern with ``native/`` first in its ``__path__``, so ``sdkern._C`` and
``sdkern.ort.library_path()`` resolve to the sanitized builds (the editable install's import hook,
which would map them to the normal build, is removed).
"""

import importlib.abc
import importlib.util
import os
import sys

_NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
_PKG = os.path.join(os.environ["SDKERN_SOURCE_DIR"], "sdkern")


class _SanitizedSdkern(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "sdkern":
            return None
        init = os.path.join(_PKG, "__init__.py")
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[_NATIVE, _PKG])


sys.meta_path[:] = [f for f in sys.meta_path if "_editable" not in type(f).__module__]
sys.meta_path.insert(0, _SanitizedSdkern())
