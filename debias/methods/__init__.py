"""Method registry: the sweep file's `method:` names a class here."""

from __future__ import annotations

from debias.methods.base import Method
from debias.methods.clusterfix import ClusterFix
from debias.methods.erm import ERM
from debias.methods.slim import SLIM

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (ERM, ClusterFix, SLIM)}

__all__ = ["METHODS", "Method"]
