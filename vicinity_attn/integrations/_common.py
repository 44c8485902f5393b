"""What the integrations share: the op's options and the lazy import of a library."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..common.validation import check_options

# The options of vicinity_attention a converted layer takes (the grids and prefix tokens come from the
# model), with the op's defaults.
OP_DEFAULTS = dict(variant="sum", feature_map="relu", eps=1e-4, den_floor=0.0, clamp=None, backend="auto")


def op_options(options: dict, defaults: dict | None = None) -> dict:
    """``options`` (keyword arguments of a conversion) checked and completed: a dict of ``variant``,
    ``feature_map``, ``eps``, ``den_floor``, ``clamp`` and ``backend`` for ``vicinity_attention``.
    An unknown name is a TypeError naming it; a bad value the op's ValueError naming the option."""
    unknown = sorted(set(options) - set(OP_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}: the options are the op's "
                        f"{', '.join(OP_DEFAULTS)}")
    out = {**OP_DEFAULTS, **(defaults or {}), **options}
    checked = check_options(variant=out["variant"], feature_map=out["feature_map"], eps=out["eps"],
                            den_floor=out["den_floor"], clamp=out["clamp"], num_prefix_tokens=0,
                            backend=out["backend"])
    checked.pop("num_prefix_tokens")
    return {**checked, "backend": out["backend"]}


def options_repr(options: dict) -> str:
    """The options that differ from the op's defaults, for ``extra_repr``."""
    return ", ".join(f"{k}={v!r}" for k, v in options.items() if v != OP_DEFAULTS[k] or k == "variant")


def require(package: str, purpose: str) -> ModuleType:
    """``import package``, or an ImportError that says what to install and why."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs the {package} package, which is not installed: pip install {package} "
                          f"({exc})") from exc


def check_no_attn_drop(attn_drop: float, where: str) -> float:
    """Linear attention forms no attention matrix, so attention dropout has nothing to act on: only 0 is
    accepted (a silent no-op would change training without telling)."""
    p = float(attn_drop)
    if p != 0.0:
        raise ValueError(f"attn_drop={attn_drop!r} is not supported by {where}: linear attention forms no "
                         f"attention matrix to drop from; build the model with attn_drop = 0 (timm: "
                         f"attn_drop_rate=0)")
    return p
