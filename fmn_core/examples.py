"""The training prompts of a Forget Train run: each concept's templates encoded beside
their anchor versions, the concept's columns located, the kept concepts' prompts, and the
preserve prompts that an update must leave alone (cached per text encoder state)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from . import aim, host
from .concepts import Concept, keep_prompts, preserve_prompts, with_kept
from .latents import LatentSource, noisy
from .loss import KEEP, Sample
from .tokens import SpecialTokens, anchor_alignment, column_mask, concept_positions, content_tokens


@dataclass
class Example:
    """One training prompt: its context (1, T, D), the concept's column mask (T,), the
    anchor context (1, T', D) of the same prompt with the anchor in the concept's place, and the copies of
    the concept in later tokens (rows of context minus their anchor twins, (N, D))."""

    concept: int
    context: torch.Tensor
    mask: torch.Tensor
    anchor: torch.Tensor
    copies: torch.Tensor
    pooled: torch.Tensor | None = None  # (1, width): SDXL's vector conditioning needs it
    anchor_pooled: torch.Tensor | None = None
    # The closed-form warm start's pairs: context rows (N, D) of the concept's tokens and
    # of the later tokens that copy it, and what each should read as (its anchor twin).
    edit_rows: torch.Tensor | None = None
    edit_targets: torch.Tensor | None = None


def build_examples(clip, concepts: list[Concept], include_end: bool, keep: tuple[str, ...] = ()) -> list[Example]:
    """Encode every template prompt of every concept and locate the concept's tokens.

    With a keep list, the preservation term: each concept's templates also appear beside
    each kept concept (their anchor versions keep it), and the kept concepts' own prompts
    join as examples with no concept columns whose anchor is the prompt itself, so the
    output term holds the original model's prediction on them, and the aim avoids them."""
    special = SpecialTokens(**host.special_tokens(clip))
    examples = [_kept_example(clip, prompt) for prompt in keep_prompts(keep)]
    concepts = [with_kept(c, keep) for c in concepts]
    for index, concept in enumerate(concepts):
        needle = content_tokens(host.tokenize(clip, concept.text), special)
        if not needle:
            raise ValueError(f"concept {concept.text!r} tokenizes to nothing usable: give words or embedding:NAME")
        anchor_length = len(content_tokens(host.tokenize(clip, concept.anchor), special))
        for prompt, anchor in zip(concept.prompts(), concept.anchor_prompts()):
            chunks = host.tokenize(clip, prompt)
            positions = concept_positions(chunks, needle, special, include_end)
            if not positions:
                raise ValueError(f"concept {concept.text!r} was not found in its prompt {prompt!r} after tokenizing")
            (context, pooled), (anchor_context, anchor_pooled) = host.encode_pooled(clip, prompt), host.encode_pooled(clip, anchor)
            mask = column_mask(positions, context.shape[1])
            exact = concept_positions(chunks, needle, special, False)
            pairs = anchor_alignment(chunks, host.tokenize(clip, anchor), exact, anchor_length)
            rows, twins = [i for i, _ in pairs], [j for _, j in pairs]
            copies = context[0, rows] - anchor_context[0, twins]
            target = _concept_target(anchor_context[0], exact[0], anchor_length)
            edit_rows = torch.cat([context[0, exact], context[0, rows]])
            edit_targets = torch.cat([target.expand(len(exact), -1), anchor_context[0, twins]])
            examples.append(Example(index, context, mask, anchor_context, copies, pooled, anchor_pooled,
                                    edit_rows, edit_targets))
    return examples


def _concept_target(anchor_context: torch.Tensor, start: int, anchor_length: int) -> torch.Tensor:
    """What the concept's tokens should read as: the mean of the anchor's words where the
    concept stood, or with no anchor the word before the gap (same causal prefix)."""
    if anchor_length:
        return anchor_context[start:start + anchor_length].mean(0)
    return anchor_context[start - 1]


def _kept_example(clip, prompt: str) -> Example:
    context, pooled = host.encode_pooled(clip, prompt)
    return Example(KEEP, context, torch.zeros(context.shape[1]), context, context.new_zeros((0, context.shape[-1])),
                   pooled, pooled)


_PRESERVE_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(clip, name: str, compute: Callable[[], object]) -> object:
    """`compute()` once per text encoder state: what is cached depends only on the encoder's
    weights, patches and layer choice, and the preserve prompts take a few seconds on a CPU
    for a full-size encoder."""
    module, key = host.text_encoder_state(clip)
    per_encoder = _PRESERVE_CACHE.setdefault(module, {})
    if (key, name) not in per_encoder:
        per_encoder[key, name] = compute()
    return per_encoder[key, name]


def preserve_contexts(clip) -> torch.Tensor:
    """The preserve prompts' contexts (N, 77, D), the empty prompt included, encoded once per
    text encoder state and shared by every run."""
    return _cached(clip, "contexts", lambda: host.encode_many(clip, preserve_prompts()))


def preserve_moment(clip) -> aim.SecondMoment:
    """Second moment of the preserve prompts' contexts, cached like them."""
    def moment() -> aim.SecondMoment:
        contexts = preserve_contexts(clip)
        return aim.SecondMoment(contexts.shape[-1]).add(contexts.reshape(-1, contexts.shape[-1]))
    return _cached(clip, "moment", moment)


def anchor_moment(examples: list[Example]) -> aim.SecondMoment:
    """Second moment of the examples' anchor contexts (a kept prompt is its own anchor)."""
    own = aim.SecondMoment(examples[0].context.shape[-1])
    for e in examples:
        own.add(e.anchor[0])
    return own


def preserved(clip, examples: list[Example]) -> aim.SecondMoment:
    """The contexts an update must leave alone: the preserve prompts and the training
    prompts' anchor versions."""
    return preserve_moment(clip).merged(anchor_moment(examples))


def draw(examples: list[Example], source: LatentSource, sampling, generator: torch.Generator, index: int) -> Sample:
    """One sample, concepts taken in turn."""
    concepts = sorted({e.concept for e in examples})
    concept = concepts[index % len(concepts)]
    pool = [e for e in examples if e.concept == concept]
    example = pool[int(torch.randint(len(pool), (1,), generator=generator))]
    x, sigma, _ = noisy(sampling, source.draw(concept, generator)[None], generator)
    return Sample(x, example.context, example.anchor, example.mask[None], sigma, example.pooled, example.anchor_pooled,
                  example.concept, example.context, example.pooled)
