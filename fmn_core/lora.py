"""Trainable low-rank updates of attn2 projections and their kohya-format export.

`LowRankDelta` is a host weight wrapper: the host calls it with the (copied) weight at
cast time and uses the result, so the update is differentiable without touching the
shared module. In the aimed mode `down` is a fixed basis of concept directions and only
`up` trains; in the free mode both train, as in an ordinary LoRA.

Every delta carries a fixed `scale` of 1/sqrt(head dim). An attention logit sums a key
change over the head's dimensions and divides by sqrt(head dim), so with Adam (whose step
per entry is the learning rate) an unscaled update moves logits sqrt(head dim) times
faster in wide heads; the scale makes one learning rate mean the same across layers and
architectures (SD1.5 heads are 40-160 wide, SD2 heads 64).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

FULL_RANK = "full"  # the fmn.rank of a patch of whole-matrix (dense) updates


class LowRankDelta(torch.nn.Module):
    def __init__(self, up: torch.Tensor, down: torch.Tensor | None, train_down: bool, scale: float):
        super().__init__()
        self.scale = scale
        self.enabled = True  # off: the host sees the original weight (teacher passes)
        self.up = torch.nn.Parameter(up)
        if down is None:  # dense: `up` is the whole update
            self.down = None
        elif train_down:
            self.down = torch.nn.Parameter(down)
        else:
            self.register_buffer("down", down)

    @classmethod
    def aimed(cls, out_features: int, basis: torch.Tensor, scale: float) -> "LowRankDelta":
        """Only `up` trains; the update lies in span(basis) on the input side."""
        return cls(torch.zeros(out_features, basis.shape[1]), basis.T.contiguous().clone(), False, scale)

    @classmethod
    def free(cls, out_features: int, in_features: int, rank: int, scale: float, generator: torch.Generator) -> "LowRankDelta":
        """An ordinary LoRA: `up` starts at zero, `down` random with unit-norm rows."""
        down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        return cls(torch.zeros(out_features, rank), down, True, scale)

    @classmethod
    def dense(cls, out_features: int, in_features: int) -> "LowRankDelta":
        """A full-weight update (the reference recipe trains whole matrices): `up` is the
        update itself, so the paper's learning rates mean what they meant there."""
        return cls(torch.zeros(out_features, in_features), None, False, 1.0)

    def delta(self) -> torch.Tensor:
        if self.down is None:
            return self.up * self.scale
        return (self.up * self.scale) @ self.down

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + self.delta().to(device=weight.device, dtype=weight.dtype)

    def move_to(self, device: torch.device) -> int:
        """Called by the host when it moves weight functions with the model."""
        self.to(device)
        return sum(t.numel() * t.element_size() for t in (self.up, self.down) if t is not None)


def kohya_name(weight_key: str) -> str:
    """`diffusion_model.a.b.weight` -> `lora_unet_a_b`: the host's (SGM) name, which its
    loader maps back. Files are written in kohya's naming for their architecture, the
    same for SDXL and diffusers block names for SD1.x/2.x (`kohya.py`, `patch.save_patch`)."""
    module = weight_key[len("diffusion_model."):-len(".weight")]
    return "lora_unet_" + module.replace(".", "_")


# The host's generic LoRA key prefix for text-encoder weights, and the token table under
# each encoder's key (clip_l, clip_h, clip_g): where a 'token rows' patch keeps its edit.
TEXT_PREFIX = "text_encoders."
TOKEN_TABLE = "transformer.text_model.embeddings.token_embedding"


def token_table_name(embedding_key: str) -> str:
    """The LoRA module name of an encoder's token table, as the host's CLIP key map names it."""
    return f"{TEXT_PREFIX}{embedding_key}.{TOKEN_TABLE}"


def is_text_module(module: str) -> bool:
    """A LoRA module of the text encoder, not the UNet."""
    return module.startswith(TEXT_PREFIX)


@contextlib.contextmanager
def disabled(deltas: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Run the original model (the frozen teacher) without a second copy of it: every
    module here has an `enabled` flag (a LowRankDelta, a gate's KeyInputEdit)."""
    for d in deltas.values():
        d.enabled = False
    try:
        yield
    finally:
        for d in deltas.values():
            d.enabled = True


def _factors(delta: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = the update; a dense update is factored exactly by SVD."""
    up = delta.up.detach().cpu().float() * delta.scale
    if delta.down is None:
        u, s, vh = torch.linalg.svd(up, full_matrices=False)
        return u * s, vh
    return up, delta.down.detach().cpu().float()


def export_kohya(deltas: dict[str, LowRankDelta], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The trained deltas as a kohya LoRA state dict (alpha = rank, so the scale is 1)."""
    out: dict[str, torch.Tensor] = {}
    for key, delta in deltas.items():
        name = kohya_name(key)
        up, down = _factors(delta)
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(up.shape[1]))
    return out
