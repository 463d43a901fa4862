"""Held-out attention measurements shared by the training tests."""
from __future__ import annotations

import torch

from fmn_pack.fmn_core import host, metrics
from fmn_pack.fmn_core.tokens import SpecialTokens, concept_positions, content_tokens

HELD_OUT_SEEDS = [101, 202]
HELD_OUT_TIMESTEPS = [200, 700]
RESOLUTION = 128
HELD_OUT_TEMPLATES = ["a quiet village painted by {}", "{} sunflowers on a table"]
# The attention-level checks' training budget: the paper's (35 steps, its loss alone), at
# lr 0.01 and rank 2; they check where an update acts (the aim), not how far it goes.
PAPER_BUDGET = {"steps": 35, "learning_rate": 1e-2, "rank": 2, "output_weight": 0.0, "warm_start": False}
PROMPTS_WITHOUT_CONCEPT = [
    "a red bicycle leaning against a brick wall",
    "an astronaut riding a horse on the moon",
    "a bowl of soup with fresh bread",
]


def shares(model, clip, prompt: str) -> torch.Tensor:
    context, pooled = host.encode_pooled(clip, prompt)
    return metrics.token_shares(model, context, HELD_OUT_SEEDS, HELD_OUT_TIMESTEPS, RESOLUTION, pooled)


def concept_columns(clip, concept: str, prompt: str) -> list[int]:
    """Positions of the concept's tokens in `prompt`."""
    special = SpecialTokens(**host.special_tokens(clip))
    needle = content_tokens(host.tokenize(clip, concept), special)
    return concept_positions(host.tokenize(clip, prompt), needle, special)


def concept_share_ratio(before, after, clip, concept: str, after_clip=None, templates=HELD_OUT_TEMPLATES) -> float:
    """Largest after/before ratio of the concept's attention share over `templates`
    (`after_clip`: the patched text encoder, for patches that edit it)."""
    after_clip = clip if after_clip is None else after_clip
    ratios = []
    for template in templates:
        prompt = template.format(concept)
        positions = concept_columns(clip, concept, prompt)
        ratios.append(float(shares(after, after_clip, prompt)[positions].sum() / shares(before, clip, prompt)[positions].sum()))
    return max(ratios)


def word_positions(clip, prompt: str) -> list[int]:
    """Positions of the prompt's words: between the start token and the real end token."""
    special = SpecialTokens(**host.special_tokens(clip))
    tokens = host.tokenize(clip, prompt)[0]
    end = next(i for i, t in enumerate(tokens[1:], start=1) if t == special.end)
    return list(range(1, end))


def worst_word_change(before, after, clip, after_clip=None, prompts=PROMPTS_WITHOUT_CONCEPT) -> float:
    """Largest relative change of any word's attention share in `prompts` (without the concept)."""
    after_clip = clip if after_clip is None else after_clip
    worst = 0.0
    for prompt in prompts:
        words = word_positions(clip, prompt)
        b, a = shares(before, clip, prompt)[words], shares(after, after_clip, prompt)[words]
        worst = max(worst, float(((a - b).abs() / b).max()))
    return worst
