"""Memory options of the training nodes: autocast precision and gradient checkpointing.

What a training step holds beyond the weights is the activations autograd saves for the
backward pass. Three things shrink them (bench/README.md has the measured figures):

- the UNet's own weights are frozen (`host.trainable_unet`), so autograd keeps only what
  the trained layers' gradients need: a frozen layer's input is not saved for its weight
  gradient. Always on.
- `precision` "bf16" or "fp16": autocast runs the UNet's matmuls and convolutions in
  16 bits, so their saved inputs take half the bytes (norms, softmax and the attention
  probabilities stay in fp32: a fifth less in all, measured). fp16 gets dynamic loss scaling
  (its gradients would underflow); bf16 needs none. It matters when the UNet is loaded in
  fp32 (CPU, `--force-fp32`); a UNet the host already runs in fp16 computes in fp16.
- `gradient_checkpointing`: each ResBlock and transformer block of the UNet keeps only
  its inputs and recomputes the rest during backward, about one extra forward per step.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Iterator

import torch
import torch.utils.checkpoint

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


class Precision:
    """Autocast and loss scaling for one training run on `device`."""

    def __init__(self, precision: str, device: torch.device):
        check_precision(precision)
        self.dtype = PRECISIONS[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def scaling(self) -> bool:
        """Whether non-finite gradients are expected now and then (fp16): the step is
        skipped and the scale lowered, rather than the run declared diverged."""
        return self.scaler.is_enabled()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_and_clip(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The true gradients, clipped to `max_norm`; their norm before clipping."""
        self.scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step (skipped by fp16 scaling on inf/NaN gradients), then the new scale."""
        self.scaler.step(optimizer)
        self.scaler.update()


@contextlib.contextmanager
def checkpointed(blocks: Iterable[torch.nn.Module], recomputing: Callable[[], ContextManager]) -> Iterator[None]:
    """Run `blocks` under gradient checkpointing while the context is open.

    Not the host's trainer helper (comfy_extras.nodes_train.patch), for two reasons: the
    host's transformer blocks read `transformer_options["block"]` to find the attention
    replace of their layer, and during backward that shared dict holds the last block's
    value, so each call here keeps a copy of the options as they were; and the attention
    hooks feed the loss, so each forward calls `recomputing()` and its recomputation runs
    inside the context that returns (the loss sink replays that forward's state and adds
    nothing twice). Calls without grad run unchanged.
    """
    blocks = list(blocks)
    for block in blocks:
        block.forward = _checkpointing(block.forward, recomputing)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute; the class's forward shows again


def _checkpointing(forward: Callable, recomputing: Callable[[], ContextManager]) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        calls, replay = [], recomputing()

        def body(*a, **kw):
            calls.append(None)
            if len(calls) == 1:
                return forward(*a, **kw)
            with replay:
                return forward(*a, **kw)

        return torch.utils.checkpoint.checkpoint(body, *args, use_reentrant=False, **kwargs)

    return run

