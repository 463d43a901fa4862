"""Mode 'gated k': an edit of each cross-attention layer's key input behind a gate that
opens only on prompts with the concept's words (`gate.py` holds the gate, the edit and the
patch file's form). The UNet's weights stay as they were."""
from __future__ import annotations

import torch

from .. import gate
from ..examples import Example, preserve_contexts
from ..loss import KEEP
from .base import TrainMode
from .lowrank import LowRank


class Gated(LowRank):
    """The key-input edits train through the host's attn2 patch, not as weight wrappers."""

    writes_checkpoints = False  # it trains in seconds

    def __init__(self, run, mode):
        super().__init__(run, mode)
        self.gate = gate_for(run.clip, self.examples)

    def new_deltas(self) -> dict[str, torch.nn.Module]:
        return gate.key_input_edits(self.run.layers, self.rank, self.run.generator)

    def build(self) -> list[torch.Tensor]:
        params = super().build()
        self.weights = {}
        return params

    def install(self, clone) -> None:
        clone.set_model_attn2_patch(gate.gated_key_patch(self.run.layers, self.deltas, self.gate))

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return gate.to_file(self.deltas, self.gate)


def gate_for(clip, examples: list[Example]) -> gate.ConceptGate:
    """The gate from the concepts' tokens in their training prompts, shut on every token of
    the preserve prompts (the empty one, a sampler's usual negative, among them) and of the
    kept prompts."""
    rows = [e.context[0][e.mask > 0] for e in examples if e.concept != KEEP]
    others = list(preserve_contexts(clip)) + [e.context[0] for e in examples if e.concept == KEEP]
    return gate.ConceptGate.fit(rows, others, whole_prompt=True)


GATED_K = TrainMode(("to_k",), False, "an edit of the key input behind a gate that opens only on prompts with the "
                                      "concept's words: prompts without them reach the UNet exactly as they were; not "
                                      "a LoRA (only this pack applies it), and other phrasings that do not open the "
                                      "gate still reach the concept", gated=True, trainee=Gated)
