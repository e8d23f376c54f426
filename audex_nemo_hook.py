"""Registers Audex with NeMo's ``_target_`` allow-list in any process, without importing Audex.

NeMo 3.0 refuses to instantiate classes outside ``nemo.core.classes.common.ALLOWED_TARGET_PREFIXES``, so a
plain ``ModelPT.restore_from("audex.nemo")`` in a fresh interpreter would fail on ``audex.models...``.
``audex-nemo.pth`` (installed into site-packages by ``setup.py``) imports this module at start-up; it adds a
meta-path hook that appends ``"audex."`` to the list right after NeMo's module is first imported. It imports
neither NeMo nor torch itself, so start-up cost is negligible.
"""

import importlib.abc
import sys

_TARGET_MODULE = "nemo.core.classes.common"
_PREFIXES = ("audex.",)


def _register(module) -> None:
    allowed = getattr(module, "ALLOWED_TARGET_PREFIXES", None)
    if isinstance(allowed, list):
        for prefix in _PREFIXES:
            if prefix not in allowed:
                allowed.append(prefix)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        _register(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if _TARGET_MODULE in sys.modules:
        _register(sys.modules[_TARGET_MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
