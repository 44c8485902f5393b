"""vicinity_attn: linear-complexity vicinity attention for vision models (Triton + PyTorch)."""
from . import _checkout  # noqa: F401  (maps kernels/ when run from a checkout, before anything imports them)
from .common.overflow import overflow_check, set_overflow_check
from .common.positions import feature_count, position_features
from .common.spec import VicinitySpec
from .functional import (
    knn_attention,
    resolve_backend,
    triton_available,
    vicinity_attention,
    vicinity_attention_step,
    vicinity_attention_varlen,
)
from .modules import VicinityAttention
from .vicinity.scratch import clear_cpu_scratch, cpu_scratch_bytes, cpu_scratch_limit, set_cpu_scratch_limit
from .vicinity.stream import FrameCache

__version__ = "0.1.0"

__all__ = [
    "vicinity_attention",
    "vicinity_attention_varlen",
    "vicinity_attention_step",
    "FrameCache",
    "knn_attention",
    "VicinityAttention",
    "resolve_backend",
    "triton_available",
    "position_features",
    "feature_count",
    "VicinitySpec",
    "set_cpu_scratch_limit",
    "cpu_scratch_limit",
    "cpu_scratch_bytes",
    "clear_cpu_scratch",
    "set_overflow_check",
    "overflow_check",
]
