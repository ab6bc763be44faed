"""Pickles read from files that may come from someone else, rebuilding only the globals such a file holds.

A pickle names the globals (classes, functions) it calls while it is loaded, and plain ``pickle.load``
imports and calls whatever it names: ``os.system``, ``builtins.exec``, anything. ``RestrictedUnpickler``
looks each name up in a fixed table of the objects a file of one kind is made of and refuses every
other one before anything is called; nothing is imported while it loads.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import IO, Any


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allowed table; ``module`` and ``name`` say which."""

    def __init__(self, module: str, name: str):
        super().__init__(f"refusing to load {module}.{name}")
        self.module, self.name = module, name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only the globals in ``allowed``: (module, name) -> the object to use.

    Any other global raises ``RefusedGlobal``; so does a persistent id (``pickle.Unpickler``'s own rule).
    """

    def __init__(self, file: IO[bytes], allowed: Mapping[tuple[str, str], Any], **kwargs: Any):
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def restricted_load(file: IO[bytes], allowed: Mapping[tuple[str, str], Any], **kwargs: Any) -> Any:
    """The object pickled in ``file``, rebuilt from the globals in ``allowed`` only."""
    return RestrictedUnpickler(file, allowed, **kwargs).load()


def allowed_table(*objects: Any) -> dict[tuple[str, str], Any]:
    """The table for ``objects`` (classes and functions), each under the name that pickle writes for it."""
    return {(obj.__module__, obj.__qualname__): obj for obj in objects}
