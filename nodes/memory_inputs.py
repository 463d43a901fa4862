"""The memory inputs both training nodes share (fmn_core/memory.py; figures in bench/README.md)."""
from __future__ import annotations

from ..fmn_core.memory import PRECISIONS

PRECISION_TOOLTIP = ("Autocast precision of the training step. On a full-size SD1.5 at 512 px with fp32 weights, bf16 "
                     "took the peak training memory to 81 %, and with gradient checkpointing to 25 % (measured on a "
                     "CPU, bench/README.md). fp16 adds loss scaling, for GPUs without bf16; on a CPU use bf16 (fp16 "
                     "has no fast CPU kernels). A model the host already runs in fp16 computes in fp16 either way.")
CHECKPOINTING_TOOLTIP = ("Gradient checkpointing: keep only each UNet block's input and recompute the rest during the "
                         "backward pass. 41 % of the peak training memory (full-size SD1.5, 512 px) for one more "
                         "forward per step; the same patch.")


def memory_inputs() -> dict:
    return {
        "precision": (list(PRECISIONS), {"default": "fp32", "tooltip": PRECISION_TOOLTIP}),
        "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": CHECKPOINTING_TOOLTIP}),
    }
