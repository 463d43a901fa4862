"""Modes 'k/v', 'all attn2' and 'reference': ordinary LoRA (or, for the reference recipe,
whole-matrix) updates of the attn2 projections, trained on every concept's templates.
The benchmark compares them with the aimed modes; the nodes do not offer them."""
from __future__ import annotations

import torch

from .. import host
from ..examples import build_examples, draw
from ..lora import LowRankDelta, export_kohya
from ..loss import Sample
from .base import Trainee, TrainMode


def build_deltas(patcher, layers: list[host.Attn2Layer], mode: TrainMode, rank: int, basis: torch.Tensor | None,
                 generator: torch.Generator) -> dict[str, LowRankDelta]:
    """One update per trained projection of every attn2 layer: whole (dense), aimed on
    `basis`, or an ordinary LoRA of `rank`."""
    deltas = {}
    for layer in layers:
        keys = [layer.weight_key(p) for p in mode.projections]
        scale = layer.dim_head ** -0.5
        for key, (out_features, in_features) in host.weight_shapes(patcher, keys).items():
            if mode.dense:
                deltas[key] = LowRankDelta.dense(out_features, in_features)
            elif basis is not None:
                deltas[key] = LowRankDelta.aimed(out_features, basis, scale)
            else:
                deltas[key] = LowRankDelta.free(out_features, in_features, rank, scale, generator)
    return deltas


class LowRank(Trainee):
    """Updates of UNet weights, trained on the concepts' encoded template prompts."""

    basis: torch.Tensor | None = None

    def __init__(self, run, mode):
        super().__init__(run, mode)
        config = run.config
        self.examples = build_examples(run.clip, run.concepts, config.include_end_token, config.keep)

    def build(self) -> list[torch.Tensor]:
        run = self.run
        self.deltas = self.weights = self.new_deltas()
        self.params = [p for d in self.deltas.values() for p in d.parameters() if p.requires_grad]
        for d in self.deltas.values():
            d.to(run.device)
        return self.params

    def new_deltas(self) -> dict[str, torch.nn.Module]:
        run = self.run
        return build_deltas(run.patcher, run.layers, self.mode, self.rank, self.basis, run.generator)

    def batch(self, step: int) -> list[Sample]:
        run, size = self.run, self.run.config.batch_size
        return [draw(self.examples, run.source, run.sampling, run.generator, step * size + b) for b in range(size)]

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return export_kohya(self.deltas), {}


KV = TrainMode(("to_k", "to_v"), False, "ordinary LoRA on attn2 to_k/to_v", trainee=LowRank, benchmark_only=True)
ALL_ATTN2 = TrainMode(("to_q", "to_k", "to_v", "to_out.0"), False, "ordinary LoRA on every attn2 projection",
                      trainee=LowRank, benchmark_only=True)
REFERENCE = TrainMode(("to_q", "to_k", "to_v", "to_out.0"), False,
                      "the paper's recipe: every attn2 weight trained whole (large patch; use its lr ~1e-5)", dense=True,
                      trainee=LowRank, benchmark_only=True)
