"""Vicinity attention kernels: a state pass over the keys, an output pass over the queries, and the
backward passes (DESIGN of the math: the package docs)."""
from .backward import vicinity_backward
from .forward import vicinity_forward
from .launch import Geometry

__all__ = ["vicinity_forward", "vicinity_backward", "Geometry"]
