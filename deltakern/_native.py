"""One import attempt of a deltakern extension module (`deltakern._C`, `deltakern._cpu`), remembered:
the module, or why importing it failed. Never imported at `import deltakern`; nothing here touches a
device."""

from __future__ import annotations

import importlib

UNSET = object()


class NativeModule:
    """`deltakern.<name>`, imported on the first `load()` and cached (or the reason it failed)."""

    def __init__(self, name: str, missing: str):
        self.name, self.missing = name, missing  # missing: how to get it, for require()'s error
        self._mod, self._error = UNSET, None

    @property
    def _module(self):
        return self._mod

    @_module.setter
    def _module(self, module) -> None:
        """Every change (an import, `set`, a test's monkeypatch) makes the registry resolve again: which
        backends can run may change with it."""
        from deltakern.backends import registry

        self._mod = module
        registry.invalidate()

    def load(self):
        """The module, or None if it cannot be imported (tried once, then cached)."""
        if self._mod is UNSET:
            try:
                self._module, self._error = importlib.import_module(f"deltakern.{self.name}"), None
            except Exception as exc:  # ImportError, or a module built for another Python / broken .so
                self._module, self._error = None, f"{type(exc).__name__}: {exc}"
        return self._mod

    def available(self) -> bool:
        return self.load() is not None

    def load_error(self) -> str | None:
        self.load()
        return self._error

    def require(self):
        """The module; RuntimeError saying how to get it if it is missing."""
        mod = self.load()
        if mod is None:
            raise RuntimeError(f"{self.missing} [import deltakern.{self.name} failed: {self._error}]")
        return mod

    def set(self, module=UNSET, error: str | None = None) -> tuple:
        """Replace the cached state (tests: a module built for the run, or UNSET to import again);
        returns the previous (module, error)."""
        previous = (self._module, self._error)
        self._module, self._error = module, error
        return previous
