"""Empirical risk minimisation: plain cross-entropy on the target. The reference every
debiasing method must beat, and the reference model SLIM and ClusterFix start from."""

from __future__ import annotations

from debias.methods.base import Method

__all__ = ["ERM"]


class ERM(Method):
    name = "erm"
