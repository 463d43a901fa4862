"""Mode 'token rows': the concepts' own words' rows of the text encoder's token table, the
UNet untouched (`fmn_core/token_rows.py` holds the row edit, its prompts and its file form)."""
from __future__ import annotations

import torch

from .. import host
from ..inversion import initial_rows, word_rows
from ..loss import Sample
from ..text_encoder import TextEncoders
from ..token_rows import OUTPUT_SCALE, ConceptPrompts, RowEdit, check_keep, held_out_contexts, sample, word_ids
from .base import Trainee, TrainMode


class TokenRows(Trainee):
    """Trains one row per distinct word of the concepts through a differentiable copy of
    the text encoder; with `warm_start` the rows start as the anchor's words."""

    writes_checkpoints = False  # it trains in seconds
    output_scale = OUTPUT_SCALE

    def build(self) -> list[torch.Tensor]:
        run, config = self.run, self.run.config
        self.encoder = TextEncoders(host.text_encoder_specs(run.clip))
        self.per_concept = [word_ids(run.clip, c) for c in run.concepts]
        check_keep(run.clip, run.concepts, self.per_concept, config.keep)
        self.edit = RowEdit(self.encoder, sorted({t for ids in self.per_concept for t in ids}))
        self.prompts = [ConceptPrompts(run.clip, c, ids, config.include_end_token, self.encoder, self.edit)
                        for c, ids in zip(run.concepts, self.per_concept)]
        if config.warm_start:
            for concept, ids in zip(run.concepts, self.per_concept):
                if concept.anchor.strip():
                    self.edit.start_from(ids, initial_rows(word_rows(self.encoder, run.clip, concept.anchor), len(ids)))
        self.held_out = held_out_contexts(run.clip, run.concepts, self.per_concept, self.edit, self.encoder)
        self.rank = len(self.edit.ids)
        self.params = [self.edit.change]
        return self.params

    def batch(self, step: int) -> list[Sample]:
        run, size, n = self.run, self.run.config.batch_size, len(self.run.concepts)
        picks = [(step * size + b) % n for b in range(size)]
        return [sample(self.prompts[i], i, self.edit, self.encoder, run.source, run.sampling, run.generator)
                for i in picks]

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return self.edit.export(self.encoder), {}


TOKEN_ROWS = TrainMode((), False, "the concept's own words' rows in the text encoder, UNet untouched: prompts without "
                                  "those words stay exactly as they were, but other phrasings still reach the concept "
                                  "(connect the CLIP output)", token_rows=True, trainee=TokenRows)
