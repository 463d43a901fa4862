"""A differentiable forward over the host's CLIP text encoder, for textual inversion.

The host's encoder cannot be back-propagated through: its layers add residuals in place
(`comfy/clip_model.py`) and a node loads its weights as inference tensors, which autograd
refuses to save. Inversion needs the gradient of the UNet's loss with respect to a few
input embedding rows, so this module runs the same computation out of place, on float32
copies of the host modules' weights (`host.text_encoder_specs`), with the host's own
attention function. SDXL's two encoders run side by side (`TextEncoders`): their contexts
are concatenated and the last one's projected end token is the pooled embedding, as the
host builds them. `tests/test_inversion.py` and `tests/test_sdxl.py` check it against the
host's forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class TextEncoderSpec:
    """What the host's encoder computes, as plain tensors and settings."""

    weights: dict[str, torch.Tensor]  # `text_model.*` state, float32, autograd-safe copies
    layers: int
    heads: int
    activation: Callable[[torch.Tensor], torch.Tensor]
    output_layer: int | None  # None: the last layer after the final norm; else a hidden layer index
    norm_hidden: bool  # the final layer norm is applied to a hidden-layer output too
    attention: Callable  # the host's attention: (q, k, v, heads, mask) -> out
    start: int
    end: int
    pad: int
    length: int  # tokens per chunk (77)
    embedding_key: str  # "clip_l" / "clip_h" / "clip_g": the key the host's embedding loader reads
    projection: torch.Tensor | None = None  # text_projection weight, where the host projects the pooled output


class TextEncoder:
    """One encoder: `encode(embeds)` equals the host's conditioning for the same input embeddings."""

    def __init__(self, spec: TextEncoderSpec):
        self.spec = spec
        self.w = spec.weights
        self.table = self.w["text_model.embeddings.token_embedding.weight"]
        self.positions = self.w["text_model.embeddings.position_embedding.weight"]

    @property
    def width(self) -> int:
        return self.table.shape[1]

    def token_rows(self, ids: list[int]) -> torch.Tensor:
        """Input embedding rows (n, width) of token ids."""
        return self.table[torch.tensor(ids, dtype=torch.long, device=self.table.device)]

    def _layer(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w, p = self.w, f"text_model.encoder.layers.{i}."
        h = F.layer_norm(x, x.shape[-1:], w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"])
        q, k, v = (F.linear(h, w[f"{p}self_attn.{n}.weight"], w[f"{p}self_attn.{n}.bias"]) for n in ("q_proj", "k_proj", "v_proj"))
        a = self.spec.attention(q, k, v, self.spec.heads, mask)
        x = x + F.linear(a, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"])
        h = self.spec.activation(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        return x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        return F.layer_norm(x, x.shape[-1:], w["text_model.final_layer_norm.weight"], w["text_model.final_layer_norm.bias"])

    def encode(self, embeds: torch.Tensor, ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditioning (N, length, width) from input embeddings (N, length, width): what
        the UNet's cross-attention reads; and the pooled embedding (N, width) at each row's
        end-token position: the last layer's normed end token (projected where the host
        projects it), whatever layer the context comes from."""
        n = embeds.shape[1]
        x = embeds + self.positions[:n]
        mask = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
        out_layer = self.spec.output_layer
        last = self.spec.layers - 1 if out_layer is None else out_layer % self.spec.layers
        context = None
        for i in range(self.spec.layers):
            x = self._layer(i, x, mask)
            if i == last:
                context = self._final_norm(x) if out_layer is None or self.spec.norm_hidden else x
        pooled = self._final_norm(x)[torch.arange(len(x), device=x.device), torch.tensor(ends, device=x.device)]
        return context, pooled if self.spec.projection is None else F.linear(pooled, self.spec.projection.to(pooled))

    def chunk(self, before: list[int], slots: torch.Tensor, after: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Input embeddings (length, width) of one chunk `start, before, slots, after, end,
        pad...`, laid out as the host lays out a prompt with an `embedding:` in it; and the
        slots' positions."""
        s = self.spec
        used = 2 + len(before) + len(slots) + len(after)
        if used > s.length:
            raise ValueError(f"prompt too long for one {s.length}-token chunk ({used} tokens): use a shorter template")
        head = self.token_rows([s.start, *before])
        tail = self.token_rows([*after, s.end] + [s.pad] * (s.length - used))
        first = 1 + len(before)
        return torch.cat([head, slots.to(head), tail]), list(range(first, first + len(slots)))


class TextEncoders:
    """A prompt's encoders side by side: one for SD1/SD2, CLIP-L then CLIP-G for SDXL.

    Rows are one tensor (k, sum of widths) whose columns are split per encoder, so a
    learned token is one row for the caller however many encoders read it. `encode` gives
    the host's conditioning: the encoders' contexts concatenated and the last encoder's
    pooled embedding (the one SDXL's UNet takes)."""

    def __init__(self, specs: list[TextEncoderSpec]):
        self.encoders = [TextEncoder(spec) for spec in specs]
        self.widths = [e.width for e in self.encoders]
        self.length = specs[0].length

    @property
    def width(self) -> int:
        return sum(self.widths)

    @property
    def layout(self) -> tuple[tuple[str, int], ...]:
        """(embedding key, width) per encoder: how an embedding file stores the rows."""
        return tuple((e.spec.embedding_key, e.width) for e in self.encoders)

    def token_rows(self, ids: list[int]) -> torch.Tensor:
        """Input embedding rows (n, width) of token ids, every encoder's columns."""
        return torch.cat([e.token_rows(ids) for e in self.encoders], dim=1)

    def chunk(self, before: list[int], slots: torch.Tensor, after: list[int]) -> tuple[torch.Tensor, list[int]]:
        """`TextEncoder.chunk` for every encoder, columns concatenated; and the slots' positions."""
        parts = [e.chunk(before, part, after) for e, part in zip(self.encoders, slots.split(self.widths, dim=1))]
        return torch.cat([embeds for embeds, _ in parts], dim=1), parts[0][1]

    def encode(self, embeds: torch.Tensor, ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (N, length, context width), pooled (N, last width)) of chunks whose end
        tokens stand at `ends`."""
        outputs = [e.encode(part, ends) for e, part in zip(self.encoders, embeds.split(self.widths, dim=-1))]
        return torch.cat([context for context, _ in outputs], dim=-1), outputs[-1][1]

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (1, length, width) and pooled of the empty prompt: the unconditional side of CFG."""
        embeds, _ = self.chunk([], torch.zeros((0, self.width)), [])
        return self.encode(embeds[None], [1])
