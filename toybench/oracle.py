"""The oracle: a tiny CNN that says which concepts a 32x32 image shows.

Three heads (identity, object, style), five classes each, class 0 meaning "none". Trained
by train.py on generator images with blur and noise augmentation, so that slightly soft
decoded samples are still read correctly. Pure torch: no host imports.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world

HEADS = ("identity", "object", "style")
NAMES = {"identity": world.IDENTITIES, "object": world.OBJECTS, "style": world.STYLES}


class Oracle(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.heads = nn.Linear(256, 15)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 32, 32, 3) in [0, 1] (ComfyUI IMAGE layout) -> logits (N, 3, 5)."""
        x = images.permute(0, 3, 1, 2).float() * 2 - 1
        return self.heads(self.features(x)).view(-1, 3, 5)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class index per head, (N, 3); 0 = none."""
        return self(images).argmax(-1)

    @torch.no_grad()
    def concepts(self, images: torch.Tensor) -> list[tuple[str, ...]]:
        """The concept names each image shows."""
        out = []
        for row in self.predict(images).tolist():
            out.append(tuple(NAMES[h][c - 1] for h, c in zip(HEADS, row) if c))
        return out


def probability(probabilities: torch.Tensor, concept: str) -> torch.Tensor:
    """The probability of `concept`'s class at its head, from one row of softmaxed logits (3, 5)."""
    for i, h in enumerate(HEADS):
        if concept in NAMES[h]:
            return probabilities[i, NAMES[h].index(concept) + 1]
    raise KeyError(concept)


def detects(pred: torch.Tensor, concept: str) -> torch.Tensor:
    """Bool (N,): does each predicted row show `concept`?"""
    for i, h in enumerate(HEADS):
        if concept in NAMES[h]:
            return pred[:, i] == NAMES[h].index(concept) + 1
    raise KeyError(concept)


def augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur (decoded samples are soft), small shifts and pixel noise."""
    n = images.shape[0]
    x = images.permute(0, 3, 1, 2)
    blur = torch.rand(n, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        x = torch.where(blur[:, None, None, None], xb, x)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.06
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def train(n_images: int = 8000, epochs: int = 6, seed: int = 0, log=print) -> Oracle:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels, _ = world.dataset(n_images, seed=10_000 + seed)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    net = Oracle()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    steps = epochs * (n_images // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n_images, generator=g)
        for i in range(0, n_images - 63, 64):
            idx = perm[i:i + 64]
            logits = net(augment(images[idx], g))
            loss = F.cross_entropy(logits.reshape(-1, 5), labels[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        log(f"oracle epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    return net.eval()


def accuracy(net: Oracle, n_images: int = 2400, seed: int = 123) -> dict[str, float]:
    """Per-concept binary detection accuracy on fresh generator images."""
    images, labels, _ = world.dataset(n_images, seed=seed)
    pred = net.predict(torch.from_numpy(images))
    labels = torch.from_numpy(labels)
    out = {}
    for concept in world.CONCEPTS:
        out[concept] = (detects(pred, concept) == detects(labels, concept)).float().mean().item()
    out["_exact"] = (pred == labels).all(-1).float().mean().item()
    return out


def load(state_dict: dict) -> Oracle:
    net = Oracle()
    net.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return net.eval()
