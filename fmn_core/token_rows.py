"""Forgetting in the text encoder: an edit of the concept's own rows of the token table.

An update of the UNet's cross-attention projections is linear in the text context, so it
moves every word's keys a little (docs/method.md). The rows of the token-embedding
table that the concept's words look up are read by no other prompt: editing them leaves
every prompt without those words exactly as it was, bit for bit. The rows train with
re-steering's own loss (`loss.step_loss`: the attention on the concept's columns plus
the output term with negative guidance), through the differentiable copy of the encoder
that Concept Inversion uses (`text_encoder.py`), the UNet frozen; `modes/token_rows.py` is
the mode that trains them. With `warm_start` the
rows start as the anchor's words ("a person", "an object"; Concept Inversion's
`initial_rows` fits them to the concept's token count).

The output term counts OUTPUT_SCALE times more here than in the UNet modes. A row moves
the concept's context only over what the encoder's final layer norm allows, and with the
attention term leading the rows settled where the UNet still drew the concept: on
ToyBench, at the UNet modes' balance, star stayed in 0.28 of its samples and the object
category run in 0.11 (H 0.839, 0.939); with the output term leading, 0.03 and 0.02
(H 0.986, 0.990), and 13 of the 17 runs reach H 1.000 (bench/quality.json, `token rows`).

The edit is stored as a LoRA on each encoder's token-embedding weight under the host's
generic `text_encoders.` LoRA keys: `up` holds one-hot columns that pick the rows and
`down` their change, so the stock LoraLoader applies it to a CLIP exactly as Apply Forget
Patch does. What it cannot do: a word's row is that word in every prompt ("Van Gogh"
also changes "a white van"), and the UNet still knows the concept, so other phrasings or a
learned embedding (the recovery attack) still reach it.
"""
from __future__ import annotations

import torch

from . import checks, host
from .concepts import Concept
from .inversion import Prompts
from .latents import LatentSource, noisy
from .lora import token_table_name
from .loss import Sample
from .text_encoder import TextEncoders
from .tokens import SpecialTokens, column_mask, content_tokens

OUTPUT_SCALE = 100.0  # the output term's weight here, in units of `output_weight` (module docstring)


def word_ids(clip, concept: Concept) -> list[int]:
    """The token ids of a concept's words; an `embedding:` concept has no rows to edit."""
    special = SpecialTokens(**host.special_tokens(clip))
    tokens = content_tokens(host.tokenize(clip, concept.text), special)
    if not tokens:
        raise ValueError(f"concept {concept.text!r} tokenizes to nothing usable: give words")
    if any(isinstance(t, torch.Tensor) for t in tokens):
        raise ValueError(f"concept {concept.text!r} is an embedding: mode 'token rows' edits the rows of words in the "
                         "text encoder's vocabulary; use an aimed mode for embedding:NAME concepts")
    return [int(t) for t in tokens]


def check_keep(clip, concepts: list[Concept], per_concept: list[list[int]], keep: tuple[str, ...]) -> None:
    """A kept concept is left exactly as it was unless it shares a word (`per_concept`: each
    concept's `word_ids`) with a forgotten one: then the edit would change it too, so say
    so before training."""
    special = SpecialTokens(**host.special_tokens(clip))
    edited = {t: c.text for c, ids in zip(concepts, per_concept) for t in ids}
    for kept in keep:
        shared = [t for t in content_tokens(host.tokenize(clip, kept), special) if isinstance(t, int) and t in edited]
        if shared:
            raise ValueError(f"{kept!r} (keep) shares a word with {edited[shared[0]]!r}: mode 'token rows' edits that "
                             "word in every prompt, so it cannot keep it; use mode 'aimed k/v' with this keep list")


class RowEdit(torch.nn.Module):
    """A change of some rows of the token table, one trainable row per distinct token.

    Like `LowRankDelta`, the parameter is scaled: by the table's root-mean-square entry, so
    that one learning rate moves an entry by the same fraction of its typical size in any
    encoder (a step of lr 0.1 moves each entry by a tenth of it)."""

    def __init__(self, encoder: TextEncoders, ids: list[int]):
        super().__init__()
        self.ids = ids
        self.index = {t: i for i, t in enumerate(ids)}
        self.register_buffer("base", encoder.token_rows(ids).detach().clone())
        self.scale = float(torch.cat([e.table for e in encoder.encoders], dim=1).pow(2).mean().sqrt())
        self.change = torch.nn.Parameter(torch.zeros_like(self.base))

    def start_from(self, ids: list[int], rows: torch.Tensor) -> None:
        """Start the words `ids` at `rows` (a warm start: the anchor's words)."""
        picks = torch.tensor([self.index[t] for t in ids])
        with torch.no_grad():
            self.change[picks] = (rows.to(self.base) - self.base[picks]) / self.scale

    def rows(self, ids: list[int], edited: bool = True) -> torch.Tensor:
        """Input rows (len(ids), width) of the concept's words, with or without the edit."""
        picks = torch.tensor([self.index[t] for t in ids])
        return self.base[picks] + self.change[picks] * self.scale if edited else self.base[picks]

    def export(self, encoder: TextEncoders, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """A LoRA per encoder on its token table: one-hot `up` (vocabulary, rows), `down`
        the rows' change, alpha = rows so the host's scale is 1."""
        change = (self.change.detach() * self.scale).cpu().float()
        lora, start = {}, 0
        for e in encoder.encoders:
            part = change[:, start:start + e.width]
            start += e.width
            up = torch.zeros(e.table.shape[0], len(self.ids))
            up[torch.tensor(self.ids), torch.arange(len(self.ids))] = 1.0
            name = token_table_name(e.spec.embedding_key)
            lora[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            lora[f"{name}.lora_down.weight"] = part.to(dtype).contiguous()
            lora[f"{name}.alpha"] = torch.tensor(float(len(self.ids)))
        return lora


class ConceptPrompts:
    """One concept's training prompts: its templates split around the concept, its
    words' ids, and the contexts the teacher reads: each template as the original encoder
    encodes it (for negative guidance) and its anchor prompt (the target)."""

    def __init__(self, clip, concept: Concept, ids: list[int], include_end: bool, encoder: TextEncoders,
                 edit: RowEdit):
        self.ids = ids
        self.prompts = Prompts(clip, concept.templates)
        with torch.no_grad():
            rows = edit.rows(ids, edited=False)
            self.originals = [self.prompts.encode(encoder, rows, [t]) for t in range(len(self.prompts.parts))]
        self.anchors = [host.encode_pooled(clip, prompt) for prompt in concept.anchor_prompts()]
        self.include_end = include_end

    def mask(self, template: int, length: int) -> torch.Tensor:
        """(1, length): the concept's columns in `template`, and its end token if asked."""
        before, after = self.prompts.parts[template]
        first = 1 + len(before)
        columns = list(range(first, first + len(self.ids)))
        if self.include_end:
            columns.append(first + len(self.ids) + len(after))
        return column_mask(columns, length)[None]


def held_out_contexts(clip, concepts: list[Concept], per_concept: list[list[int]], edit: RowEdit,
                       encoder: TextEncoders) -> checks.PatchedContext:
    """The checks' held-out concept prompts as the edited encoder reads them: the
    concept's rows, edited, in each check template's gap."""
    held = [Prompts(clip, checks.held_out(c).templates) for c in concepts]

    def context(concept: int, prompt: int, edited: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            return held[concept].encode(encoder, edit.rows(per_concept[concept], edited), [prompt])
    return context


def sample(prompts: ConceptPrompts, concept: int, edit: RowEdit, encoder: TextEncoders, source: LatentSource,
            sampling, generator: torch.Generator) -> Sample:
    """One training sample: a random template of the concept, encoded with the edited rows
    (the student's context, differentiable), beside the teacher's contexts."""
    template = int(torch.randint(len(prompts.prompts.parts), (1,), generator=generator))
    x, sigma, _ = noisy(sampling, source.draw(concept, generator)[None], generator)
    context, pooled = prompts.prompts.encode(encoder, edit.rows(prompts.ids), [template])
    original, original_pooled = prompts.originals[template]
    anchor, anchor_pooled = prompts.anchors[template]
    return Sample(x, context, anchor, prompts.mask(template, context.shape[1]), sigma, pooled, anchor_pooled,
                  concept, original, original_pooled)
