"""Vicinity attention kernels: a state pass over the keys, an output pass over the queries, and the
backward passes (DESIGN of the math: the package docs)."""
from .geometry import Geometry
from .launch_backward import backward_keys, backward_queries, vicinity_backward
from .launch_forward import forward_output, forward_states, saved_state_dtype, vicinity_forward
from .varlen import Packing

__all__ = ["vicinity_forward", "vicinity_backward", "forward_states", "forward_output", "backward_queries",
           "backward_keys", "saved_state_dtype", "Geometry", "Packing"]
