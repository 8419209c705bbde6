"""Old public names kept as deprecated aliases: reading one warns once per access site with
the name to use instead, and returns the very same object."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["alias_getattr"]


def alias_getattr(module: str, namespace: Mapping[str, Any], aliases: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves deprecated aliases.

    Args:
        module: The module's ``__name__`` (named in the warning and in AttributeError).
        namespace: The module's ``globals()``, where the current names live.
        aliases: Old name -> current name.

    Returns:
        The function to assign to the module's ``__getattr__``: for an old name it emits a
        DeprecationWarning naming the current one and returns the current object; any other
        name raises AttributeError as a module does.
    """

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new = aliases[name]
            warnings.warn(f"{module}.{name} is deprecated: use {module}.{new} (the same object; the old name "
                          "goes in a later release)", DeprecationWarning, stacklevel=2)
            return namespace[new]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
