"""The training modes, one module each behind the interface of `base.py`; this registry
feeds the nodes' mode list and the loop's dispatch. A new mode is a new module and a line here."""
from __future__ import annotations

from .aimed import AIMED_K, AIMED_KV
from .base import Run, Trainee, TrainMode
from .gated import GATED_K
from .lowrank import ALL_ATTN2, KV, REFERENCE
from .token_rows import TOKEN_ROWS

MODES: dict[str, TrainMode] = {
    "aimed k/v": AIMED_KV,
    "aimed k": AIMED_K,
    "k/v": KV,
    "all attn2": ALL_ATTN2,
    "reference": REFERENCE,
    "token rows": TOKEN_ROWS,
    "gated k": GATED_K,
}

# What the Forget Train nodes list; the benchmark's recipes still train through the same loop.
USER_MODES: tuple[str, ...] = tuple(name for name, mode in MODES.items() if not mode.benchmark_only)

__all__ = ["MODES", "USER_MODES", "Run", "Trainee", "TrainMode"]
