"""Learned token rows as a host embedding file (`embedding:NAME` in any prompt)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import atomic_write, safe_filename


@dataclass
class Embedding:
    """The EMBEDDING value between nodes: rows (k, width), their columns split over the
    host's encoder keys (SDXL: 768 for clip_l, then 1280 for clip_g)."""

    name: str
    vectors: torch.Tensor
    layout: tuple[tuple[str, int], ...]  # (key, width) per encoder: what the host's loader reads for it
    metadata: dict[str, str] = field(default_factory=dict)


def embedding_filename(name: str) -> str:
    """A safe file name that also works as `embedding:NAME` in a prompt, where the host's
    tokenizer ends the name at the first space."""
    return safe_filename(re.sub(r"\s+", "_", name.strip()), ".safetensors")


def save_embedding(embedding: Embedding, path: Path, overwrite: bool = False) -> Path:
    """Write `{key: rows}` per encoder with the settings as safetensors metadata, atomically."""
    from safetensors.torch import save_file

    vectors = embedding.vectors.detach().to("cpu", torch.float32)
    widths = [width for _, width in embedding.layout]
    if vectors.shape[-1] != sum(widths):
        raise ValueError(f"embedding {embedding.name!r} has rows of width {vectors.shape[-1]}, its layout "
                         f"{embedding.layout} needs {sum(widths)}")
    tensors = {key: part.contiguous() for (key, _), part in zip(embedding.layout, vectors.split(widths, dim=-1))}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=embedding.metadata), overwrite)


def describe(init_text: str, config, losses: list[float]) -> dict[str, str]:
    """Embedding header metadata: what was inverted and how (strings, as safetensors wants)."""
    return {
        "fmn.format": "forget-me-not-embedding/1",
        "fmn.init_text": init_text,
        "fmn.templates": json.dumps(list(config.templates)),
        "fmn.num_tokens": str(config.num_tokens),
        "fmn.steps": str(config.steps),
        "fmn.learning_rate": repr(config.learning_rate),
        "fmn.seed": str(config.seed),
        "fmn.final_loss": repr(round(sum(losses[-10:]) / len(losses[-10:]), 6)) if losses else "nan",
    }
