"""One cross-attention hook for training, measurement and (later) heatmaps.

`make_attn2_replace` builds the callable the host calls for a cross-attention layer as
`fn(q, k, v, extra_options)`, with q, k, v already projected. It computes the per-head
post-softmax probabilities once, hands them to a sink, and returns the attention output.
If another pack had registered a replace for the same block, that replace still produces
the output (so its effect is kept) and the probabilities are computed beside it.

Sinks receive probabilities shaped (B, heads, HW, T): the host's own head order, where
the flattened batch index is `b * heads + h`, so per-sample masks broadcast over heads.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol

import torch


class AttentionSink(Protocol):
    def __call__(self, layer: str, probs: torch.Tensor, extra_options: dict) -> None: ...


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).transpose(1, 2)  # (B, heads, N, d)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) per head, in fp32: (B, heads, HW, T)."""
    qh = _split_heads(q, heads).float()
    kh = _split_heads(k, heads).float()
    if kh.shape[0] != qh.shape[0]:
        kh = kh.expand(qh.shape[0], -1, -1, -1)
    scale = qh.shape[-1] ** -0.5
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)


def _attend(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    vh = _split_heads(v, heads)
    if vh.shape[0] != probs.shape[0]:
        vh = vh.expand(probs.shape[0], -1, -1, -1)
    out = probs.to(vh.dtype) @ vh  # (B, heads, HW, d)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def make_attn2_replace(layer: str, sink: AttentionSink, previous: Callable | None = None) -> Callable:
    """The attn2 replace for one layer: probabilities to `sink`, output as the host would."""

    def attn2_replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        probs = attention_probs(q, k, heads)
        sink(layer, probs, extra_options)
        if previous is not None:
            return previous(q, k, v, extra_options)
        return _attend(probs, v, heads)

    return attn2_replace


class ColumnEnergy:
    """Training sink: the summed squares of the target columns over all layers and heads.

    The re-steering loss is the L2 norm of every target column of every layer,
    concatenated; keeping only the running sum of squares makes memory independent of the
    number of layers and exact across sub-batches of different lengths.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (B, T)
        self.sum_squares: torch.Tensor | None = None
        self.active = True
        self.discard = False

    def reset(self, mask: torch.Tensor | None) -> None:
        self.mask, self.sum_squares = mask, None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes that are not part of the loss (the teacher's) add nothing."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def recomputing(self) -> ContextManager[None]:
        """For gradient checkpointing: called at a block's forward, entered when backward
        recomputes it. The same operations run with the mask of that forward (the
        checkpoint expects the same saved tensors), but the loss already holds them."""
        mask = self.mask

        @contextlib.contextmanager
        def replay() -> Iterator[None]:
            saved = self.mask, self.discard
            self.mask, self.discard = mask, True
            try:
                yield
            finally:
                self.mask, self.discard = saved

        return replay()

    def __call__(self, layer: str, probs: torch.Tensor, extra_options: dict) -> None:
        if not self.active:
            return
        if self.mask is None:
            raise RuntimeError("ColumnEnergy.reset(mask) must be called before the forward pass")
        mask = self.mask.to(probs.device)[:, None, None, :]  # (B, 1, 1, T)
        energy = (probs * mask).pow(2).sum()
        if self.discard:
            return
        self.sum_squares = energy if self.sum_squares is None else self.sum_squares + energy


class TokenShare:
    """Measurement sink: the share of attention each token receives, per sample.

    The share of token t is its probability averaged over pixels, heads and layers, so the
    shares of one prompt sum to 1. `grad`: keep the graph, for objectives on the shares
    themselves (scripts/bench_attention_bound.py fits updates to them).
    """

    def __init__(self, grad: bool = False) -> None:
        self.grad = grad
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None  # (B, T)
        self.layers = 0

    def __call__(self, layer: str, probs: torch.Tensor, extra_options: dict) -> None:
        share = (probs if self.grad else probs.detach()).mean(dim=(1, 2))
        self.total = share if self.total is None else self.total + share
        self.layers += 1

    def shares(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention was captured: was the model run with the hooks registered?")
        return self.total / self.layers


class Routed:
    """A sink that hands each capture to the sink currently routed to: one registration of
    the hooks serves the training loss and, in between, the run's checks (`checks.py`)."""

    def __init__(self, sink: AttentionSink) -> None:
        self.sink = sink

    def __call__(self, layer: str, probs: torch.Tensor, extra_options: dict) -> None:
        self.sink(layer, probs, extra_options)

    @contextlib.contextmanager
    def to(self, sink: AttentionSink) -> Iterator[None]:
        saved, self.sink = self.sink, sink
        try:
            yield
        finally:
            self.sink = saved
