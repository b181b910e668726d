"""The one registry that maps a method's name to its class.

``method: NAME`` in a sweep file is one of the built-in names below, a method an installed
package registers under the entry-point group ``debias.methods`` (``name = "pkg.mod:Class"``),
or ``package.module:ClassName`` for any importable module (``examples/custom_method.py`` is
one). Built-ins are imported on first use, not here: importing this package stays cheap and
the engine, which is handed a method class, never looks one up.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from importlib.metadata import entry_points

from debias.methods.base import Method

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "Method",
    "MethodLoadError",
    "known_methods",
    "resolve_method",
]

#: Built-in methods, in the order tables and plots show them (ERM first: the reference).
BUILTIN: dict[str, str] = {
    "erm": "debias.methods.erm:ERM",
    "groupdro": "debias.methods.groupdro:GroupDRO",
    "jtt": "debias.methods.jtt:JTT",
    "dfr": "debias.methods.dfr:DFR",
    "clusterfix": "debias.methods.clusterfix:ClusterFix",
    "slim": "debias.methods.slim:SLIM",
}
ENTRY_POINT_GROUP = "debias.methods"


class MethodLoadError(ValueError):
    """A ``method:`` value that names no usable method; the message says why."""


@functools.cache
def _registered() -> dict[str, str]:
    """Built-ins, then methods installed packages register (a built-in name cannot be taken)."""
    out = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep.value)
    return out


def known_methods() -> list[str]:
    """Every name ``method:`` accepts without a module path."""
    return list(_registered())


@functools.cache
def resolve_method(name: str) -> type[Method]:
    """The class behind a ``method:`` value, checked to be a method."""
    target = _registered().get(name, name)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise MethodLoadError(
            f"{name!r} is not a known method; expected one of {', '.join(known_methods())}, "
            "or package.module:ClassName for a method defined elsewhere")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MethodLoadError(
            f"{name!r}: cannot import module {module_name!r} ({exc}); is its folder on "
            "PYTHONPATH (or the package installed)?") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise MethodLoadError(f"{name!r}: module {module_name!r} has no class {class_name!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise MethodLoadError(f"{name!r}: {module_name}.{class_name} is not a method (a "
                              "subclass of debias.methods.Method)")
    if not getattr(cls, "name", None):
        raise MethodLoadError(f"{name!r}: {module_name}.{class_name} sets no `name`")
    return cls
