"""Apply patches to xfuser modules the moment each one finishes executing.

Several xfuser modules copy the values being fixed into their own globals while they are
imported (``HAS_LONG_CTX_ATTN = env_info["has_long_ctx_attn"]``, ``PROCESS_GROUP``), so a patch
must run right after its module's code and before any other module imports from it.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType
from typing import Callable

Patch = Callable[[ModuleType], None]

_MARK = "_spectrum_xdit_patch"


def patch_on_import(patches: dict[str, list[Patch]], applied: Callable[[str, Patch], None]) -> None:
    """Run ``patches[name]`` on module ``name`` now if it is imported, else right after its import;
    ``applied(name, patch)`` is told of each patch run."""
    pending = {}
    for name, functions in patches.items():
        module = sys.modules.get(name)
        if module is None:
            pending[name] = functions
            continue
        for patch in functions:
            patch(module)
            applied(name, patch)
    if pending:
        sys.meta_path.insert(0, _PatchOnImport(pending, applied))


def mark(function):
    """Mark a replacement function as this project's, so that a patch never wraps it twice."""
    setattr(function, _MARK, True)
    return function


def is_marked(function) -> bool:
    return getattr(function, _MARK, False)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the listed modules with the other finders and patches each right after it runs."""

    def __init__(self, patches: dict[str, list[Patch]], applied: Callable[[str, Patch], None]):
        self._patches = patches
        self._applied = applied
        self._searching: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        patches = self._patches.get(fullname)
        if patches is None or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = _PatchingLoader(spec.loader, fullname, patches, self._applied)
                    return spec
            return None
        finally:
            self._searching.discard(fullname)


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then applies the patches to the executed module."""

    def __init__(self, loader, name: str, patches: list[Patch], applied: Callable[[str, Patch], None]):
        self._loader = loader
        self._name = name
        self._patches = patches
        self._applied = applied

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for patch in self._patches:
            patch(module)
            self._applied(self._name, patch)

    def __getattr__(self, name):
        return getattr(self._loader, name)
