"""Does this machine compute ToyBench's floats bit for bit as the one that wrote a fixture?

Hashes of trained files pin bytes, and bytes depend on the CPU's kernels (vector width,
the math library's code path) and the thread count, not only on the code. A fixture of
hashes therefore carries this probe, computed where the fixture was written: a text
encoding, a UNet forward and a backward to one cross-attention key projection, on
ToyBench. Where the probe differs, the machine rounds differently and the fixture says
nothing about the code, so a test skips with that reason instead of failing on arithmetic
it does not judge.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


def probe(toy) -> str:
    """sha256 of the probe's three results on this machine."""
    patcher, clip, _ = toy
    unet = patcher.model.diffusion_model
    to_k = next(m for name, m in unet.named_modules() if name.endswith("attn2.to_k"))
    digest = hashlib.sha256()
    with torch.inference_mode(False), torch.enable_grad():
        context = clip.encode_from_tokens(clip.tokenize("a photo of a star")).clone()
        x = torch.randn(2, unet.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
        delta = torch.zeros_like(to_k.weight, requires_grad=True)
        to_k.forward = lambda h: F.linear(h, to_k.weight + delta, to_k.bias)  # the instance's, for this probe only
        try:
            out = unet(x, timesteps=torch.tensor([100.0, 700.0]), context=context.expand(2, -1, -1))
            out.square().sum().backward()
        finally:
            del to_k.forward
        for tensor in (context, out.detach(), delta.grad):
            digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()
