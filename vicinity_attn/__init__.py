"""vicinity_attn: linear-complexity vicinity attention for vision models (Triton + PyTorch)."""
from .functional import resolve_backend, triton_available, vicinity_attention, vicinity_attention_varlen
from .modules import VicinityAttention
from .positions import feature_count, position_features
from .backends.scratch import clear_cpu_scratch, cpu_scratch_bytes, cpu_scratch_limit, set_cpu_scratch_limit
from .spec import VicinitySpec

__version__ = "0.1.0"

__all__ = [
    "vicinity_attention",
    "vicinity_attention_varlen",
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
]

from .functional import knn_attention  # noqa: E402

__all__ += ["knn_attention"]
