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

import math

import torch


class LowRankDelta(torch.nn.Module):
    def __init__(self, up: torch.Tensor, down: torch.Tensor, train_down: bool, scale: float):
        super().__init__()
        self.scale = scale
        self.up = torch.nn.Parameter(up)
        if train_down:
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

    def delta(self) -> torch.Tensor:
        return (self.up * self.scale) @ self.down

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(device=weight.device, dtype=weight.dtype)

    def move_to(self, device: torch.device) -> int:
        """Called by the host when it moves weight functions with the model."""
        self.to(device)
        return sum(t.numel() * t.element_size() for t in (self.up, self.down))


def kohya_name(weight_key: str) -> str:
    """`diffusion_model.a.b.weight` -> `lora_unet_a_b`, the name the stock loader maps back."""
    module = weight_key[len("diffusion_model."):-len(".weight")]
    return "lora_unet_" + module.replace(".", "_")


def export_kohya(deltas: dict[str, LowRankDelta], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The trained deltas as a kohya LoRA state dict (alpha = rank, so the scale is 1)."""
    out: dict[str, torch.Tensor] = {}
    for key, delta in deltas.items():
        name = kohya_name(key)
        up = delta.up.detach().cpu() * delta.scale
        down = delta.down.detach().cpu()
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(up.shape[1]))
    return out
