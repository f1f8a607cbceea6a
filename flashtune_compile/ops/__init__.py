"""Tunable ops in the ``flashtune`` namespace (``torch.ops.flashtune.*``).

An op is described once, by an ``OpSpec`` next to its code (``matmul.py``, ``moe.py``), and made a
torch op by ``registry.register``; ``site.py`` runs a call's choice. An op module registers its
ops when imported: the graph pass that routes to them imports it (``passes/__init__.py``).
"""

from .registry import DIRECT, OPS, op_families, register
from .site import SiteOptions, SiteSpec, runners_for, site_string
from .spec import Candidate, OpSpec

__all__ = [
    "DIRECT",
    "OPS",
    "Candidate",
    "OpSpec",
    "SiteOptions",
    "SiteSpec",
    "op_families",
    "register",
    "runners_for",
    "site_string",
]
