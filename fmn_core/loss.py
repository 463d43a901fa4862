"""One training step's loss, the same for every mode (docs/method.md).

||attention on the concept's token columns||_2 over all layers and heads, plus the output
term (weight `output_weight`, 0 = the paper's loss alone): the concept's prompt should
denoise as the same prompt with the concept's anchor in its place ("a person", "an object",
or nothing) does in the original model. Attention alone cannot finish the job: a causal
text encoder copies the concept into every later token, and a model reads a concept from a
few percent of the attention (ToyBench measures both). The original model is the teacher,
run by switching the deltas off, so no second copy of the UNet is held; with
`negative_guidance` its target lies past the anchor, away from the concept (`pushed_away`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from .attention import ColumnEnergy
from .lora import LowRankDelta, disabled

KEEP = -1  # Sample.concept (and Example.concept) of a kept concept's prompt


def step_loss(unet, sink: ColumnEnergy, batch: list[Sample], deltas: dict[str, LowRankDelta],
              output_weight: float, negative_guidance: float, device: torch.device) -> torch.Tensor:
    """||target columns||_2 over every layer and head of the whole batch, plus
    `output_weight` times the mean squared difference between the patched model's noise
    prediction for the concept's prompt and the original model's for the anchor prompt
    (pushed away from the concept with `negative_guidance`).

    Samples whose contexts differ in length run as separate forwards; summing squares
    across them keeps the norm exactly that of the concatenated batch.
    """
    sink.reset(None)
    output_sq = torch.zeros((), device=device)
    count = 0
    for group in _group_by_length(batch):
        x, context, anchor, mask, sigma, original = (torch.cat([g[i] for g in group]).to(device) for i in (0, 1, 2, 3, 4, 8))
        pooled, anchor_pooled, original_pooled = (_joined([g[i] for g in group], device) for i in (5, 6, 9))
        if output_weight:
            with torch.no_grad(), disabled(deltas), sink.paused():
                teacher = unet(x, sigma, anchor, anchor_pooled)
                if negative_guidance and any(g.concept != KEEP for g in group):  # a kept prompt's target is its own
                    teacher = pushed_away(teacher, unet(x, sigma, original, original_pooled), negative_guidance)
        sink.mask = mask
        student = unet(x, sigma, context, pooled)
        if output_weight:
            scale = sigma.reshape(-1, *([1] * (x.ndim - 1)))
            output_sq = output_sq + ((student - teacher) / scale).float().pow(2).sum()
            count += student.numel()
    loss = sink.sum_squares.clamp_min(1e-12).sqrt()  # a kept prompt has no concept columns: no NaN gradient at 0
    if output_weight:
        loss = loss + output_weight * output_sq / count
    return loss


def pushed_away(anchor: torch.Tensor, concept: torch.Tensor, guidance: float) -> torch.Tensor:
    """The original model's prediction for the anchor prompt, moved `guidance` times its
    difference from the prediction for the concept's prompt further from the concept (ESD's
    negative guidance, aimed at the anchor rather than at the empty prompt).

    Matching the anchor alone stops where a noisy latent already shows the concept: there
    the anchor prompt's prediction keeps it too, so a residual of samples still draw it.
    A kept prompt is its own anchor, so its target is unchanged. ToyBench, the twelve
    single-concept runs (H, 48 seeds per prompt): 0 mean 0.983, star 0.917 (0.118 of its
    samples left); 0.5 mean 0.991, star 0.978 (0.021), the lowest Doctor Vex 0.978; 1 mean
    0.987, the neighbours lose more (Doctor Vex 0.966)."""
    return anchor - guidance * (concept - anchor)


def _joined(rows: list[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """Pooled embeddings of a group as one batch (None when the encoder gives none)."""
    return None if any(r is None for r in rows) else torch.cat(rows).to(device)


class Sample(NamedTuple):
    """One training sample. `original` (and its pooled) is the concept's prompt as the
    original model reads it, for the teacher's negative guidance: the same tensor as
    `context` when the update lives in the UNet, the unedited encoding when it lives in
    the text encoder (`token_rows.py`)."""

    x: torch.Tensor
    context: torch.Tensor
    anchor: torch.Tensor
    mask: torch.Tensor
    sigma: torch.Tensor
    pooled: torch.Tensor | None
    anchor_pooled: torch.Tensor | None
    concept: int
    original: torch.Tensor
    original_pooled: torch.Tensor | None


def check_finite(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, scaling: bool = False) -> None:
    """A non-finite loss, or gradient norm (unless fp16 loss scaling skips such steps), ends the run."""
    if not torch.isfinite(loss) or not (scaling or torch.isfinite(grad_norm)):
        raise RuntimeError(
            f"Forget Train diverged at step {step + 1} (loss {float(loss)}, gradient norm {float(grad_norm)}): "
            "no patch was produced; lower learning_rate or steps"
        )


def check_finite_tensors(lora: dict[str, torch.Tensor], producer: str = "Forget Train") -> None:
    bad = [k for k, v in lora.items() if not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"{producer} produced non-finite weights in {len(bad)} tensors (e.g. {bad[0]}): "
                           "no patch was produced; lower learning_rate")




def _group_by_length(samples: list[Sample]) -> list[list[Sample]]:
    """Samples whose context and anchor lengths agree, so each group stacks into one batch."""
    groups: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.context.shape[1], sample.anchor.shape[1]].append(sample)
    return list(groups.values())
