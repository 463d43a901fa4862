"""The interface every training mode implements, beside the one loop (`loop.py`).

A mode is a registry entry (`TrainMode`: its name, description and header flags) whose
`trainee` class holds what one run trains. The loop calls it in this order:

    trainee = mode.start(run)       # in the caller's inference mode: prompts, aim
    params = trainee.build()        # outside inference mode: the trainable tensors
    optimizer = trainee.optimizer()
    trainee.install(clone)          # patches on the training clone before the attn2 hooks
    trainee.warm_start(clone)       # a fresh run only, the clone loaded
    per step: trainee.batch(step) -> samples; loss.step_loss(...); trainee.stepped(optimizer, batch)
    lora, fields = trainee.export() # the patch's tensors and its extra header fields

`deltas` are the modules the teacher and the checks switch off (`lora.disabled`) to see the
original model; `weights` those wrapped into the UNet's weights (`host.trainable_unet`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager

import torch

from ..latents import LatentSource
from ..lora import disabled
from ..loss import Sample
from ..optim import ColumnAdamW


@dataclass(frozen=True)
class TrainMode:
    projections: tuple[str, ...]   # the attn2 projections it changes (none for the text encoder's rows)
    aimed: bool                    # confined to the concept's context directions (aim.py): warm start, ColumnAdamW
    description: str
    dense: bool = False            # whole-matrix updates (the reference recipe), not low-rank
    token_rows: bool = False       # the concept's rows of the text encoder's token table, no UNet weight
    gated: bool = False            # an edit of the key input behind a gate on the concept's token vectors (gate.py)
    trainee: type | None = None    # the strategy class: Trainee(run, mode)
    benchmark_only: bool = False   # a recipe kept for the benchmark's comparisons, not offered on the nodes

    def start(self, run: Run) -> Trainee:
        return self.trainee(run, self)


@dataclass
class Run:
    """What the loop hands a mode: the inputs of one run and its shared randomness."""

    patcher: object
    clip: object
    concepts: list          # [Concept]
    config: object          # ForgetConfig
    layers: list            # [host.Attn2Layer]
    generator: torch.Generator
    source: LatentSource
    sampling: object
    device: torch.device


class Trainee:
    """One run's trainable part. Defaults fit a mode that changes UNet weights."""

    writes_checkpoints = True  # save_every / resume_from
    output_scale = 1.0         # the output term's weight, in units of config.output_weight
    held_out = None            # checks.PatchedContext when the edit lives in the text encoder

    def __init__(self, run: Run, mode: TrainMode):
        self.run, self.mode = run, mode
        self.rank = run.config.rank  # the header's fmn.rank
        self.params: list[torch.Tensor] = []
        self.deltas: dict[str, torch.nn.Module] = {}
        self.weights: dict[str, torch.nn.Module] = {}

    def build(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.params, self.run.config)

    def install(self, clone) -> None:
        pass

    def warm_start(self, clone) -> None:
        pass

    def original(self) -> ContextManager:
        """The original model for the checks: the deltas switched off."""
        return disabled(self.deltas)

    def batch(self, step: int) -> list[Sample]:
        raise NotImplementedError

    def stepped(self, optimizer: torch.optim.Optimizer, batch: list[Sample]) -> None:
        """Called after the backward pass, before the optimiser steps."""

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        raise NotImplementedError


def make_optimizer(params: list[torch.Tensor], config, owners: torch.Tensor | None = None) -> torch.optim.Optimizer:
    """AdamW; with several concepts in an aimed run, AdamW that steps only the present
    concepts' columns (`optim.py` says why)."""
    if owners is None or len(owners.unique()) < 2:
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return ColumnAdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
