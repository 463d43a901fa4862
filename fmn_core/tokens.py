"""Token locator: which context positions of a tokenized prompt belong to a concept.

Pure functions over token chunks as the host produces them: one list per 77-token chunk,
each entry an int id or an embedding tensor (from `embedding:NAME`). The UNet context is
the chunks concatenated, so a position is `chunk * chunk_len + index`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Token = int | torch.Tensor


@dataclass(frozen=True)
class SpecialTokens:
    start: int | None
    end: int | None
    pad: int | None
    chunk: int = 77


def _same(a: Token, b: Token) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
        )
    return a == b


def content_tokens(chunks: list[list[Token]], special: SpecialTokens) -> list[Token]:
    """The tokens of a standalone phrase: every chunk without start, end and padding."""
    markers = {special.start, special.end, special.pad} - {None}
    return [t for chunk in chunks for t in chunk if isinstance(t, torch.Tensor) or t not in markers]


def _matches(chunk: list[Token], needle: list[Token]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(chunk) - n + 1) if all(_same(chunk[i + j], needle[j]) for j in range(n))]


def _end_position(chunk: list[Token], special: SpecialTokens) -> int | None:
    """The chunk's real end token: the first end id after the start (SD1 pads with it too)."""
    for i, token in enumerate(chunk[1:], start=1):
        if not isinstance(token, torch.Tensor) and token == special.end:
            return i
    return None


def concept_positions(
    chunks: list[list[Token]], concept: list[Token], special: SpecialTokens, include_end: bool = False,
) -> list[int]:
    """Every exact occurrence of `concept` in the prompt, as context positions.

    With `include_end`, each chunk that holds an occurrence also contributes its one real
    end token (never the padding that follows it).
    """
    if not concept:
        raise ValueError("the concept tokenizes to nothing: give a word, a phrase or embedding:NAME")
    positions: list[int] = []
    for c, chunk in enumerate(chunks):
        offset = c * special.chunk
        starts = _matches(chunk, concept)
        for s in starts:
            positions.extend(offset + s + j for j in range(len(concept)))
        if starts and include_end:
            end = _end_position(chunk, special)
            if end is not None:
                positions.append(offset + end)
    return sorted(set(positions))


def column_mask(positions: list[int], length: int) -> torch.Tensor:
    """A [length] float mask with ones at `positions`."""
    mask = torch.zeros(length)
    if positions:
        mask[torch.tensor(positions)] = 1.0
    return mask


def anchor_alignment(
    chunks: list[list[Token]], anchor_chunks: list[list[Token]], positions: list[int], anchor_length: int,
) -> list[tuple[int, int]]:
    """Pairs (prompt position, anchor position) of the tokens after the concept, where the
    anchor prompt is the same prompt with each occurrence of the concept replaced by
    `anchor_length` tokens (0: left out).

    A causal text encoder copies the concept into every later token; the difference between
    such a token's context and its anchor twin is that copy. The walk stops at the first
    token that does not line up (BPE can merge differently around the gap), and prompts
    that do not have the same number of chunks as their anchor give no pairs.
    """
    if not positions or len(chunks) != len(anchor_chunks):
        return []
    tokens = [t for chunk in chunks for t in chunk]
    anchor = [t for chunk in anchor_chunks for t in chunk]
    concept = set(positions)
    pairs, j = [], 0
    for i, token in enumerate(tokens):
        if i in concept:
            j += anchor_length if i - 1 not in concept else 0
            continue
        if j >= len(anchor) or not _same(token, anchor[j]):
            break
        if i > positions[0]:
            pairs.append((i, j))
        j += 1
    return pairs
