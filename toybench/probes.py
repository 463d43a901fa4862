"""Concept Inversion and M-Score on ToyBench: the measurements the tests and the
quality benchmark share (imported as part of the pack, not by `python -m toybench.train`).

The toy knows its own phrasings, so inversion uses them: "a portrait of {}" for
identities, "a {}" for objects, "an object in the style of {}" for styles.
"""
from __future__ import annotations

import torch

from ..fmn_core import host
from ..fmn_core.inversion import InversionConfig, Prompts, invert
from ..fmn_core.text_encoder import TextEncoders
from . import oracle as O, world

TEMPLATES = {"identity": "a portrait of {}", "object": "a {}", "style": "an object in the style of {}"}
# Starting words that are no concept: recovery from these shows inversion finds the concept itself.
GENERIC_INIT = {"identity": "person", "object": "object", "style": "style"}
# M-Score settings on the toy (the node's defaults are for full-size models). Every
# inversion starts from "thing", a word the toy never saw in training: its row is as
# neutral as a rare token in a real model. The toy's own generic words are no neutral
# start: "object" draws a white half disc on grey, so close to the white shapes that
# inversions of ring, cross or star settle beside it whatever the model holds.
M_SCORE = {"num_tokens": 4, "steps": 60, "learning_rate": 1e-2}
M_SCORE_INIT = "thing"
RECOVERY = {"num_tokens": 4, "steps": 150, "learning_rate": 1e-2}


def category(concept: str) -> str:
    return next(name for name, members in world.CATEGORIES.items() if concept in members)


def concept_latents(mp, vae, concept: str, count: int = 8, seed: int = 100) -> torch.Tensor:
    """Rendered images of `concept`, VAE-encoded into the model's input space."""
    images = torch.from_numpy(world.images_of(concept, count, seed))
    return host.process_latent_in(mp, host.vae_encode(vae, images).float())


def config_for(concept: str, **settings):
    return InversionConfig(templates=(TEMPLATES[category(concept)],), **settings)


def recovery_rate(mp, clip, vae, oracle_net, concept: str, seeds: list[int], **settings) -> tuple[float, object]:
    """Invert `concept`'s images from a generic word, sample the template with the learned
    rows in place on `seeds`, and return the oracle's detection rate (and the inversion)."""
    config = config_for(concept, **settings)
    result = invert(mp, clip, concept_latents(mp, vae, concept), GENERIC_INIT[category(concept)], config)
    return sample_rate(mp, clip, vae, oracle_net, concept, result.vectors, seeds), result


def sample_rate(mp, clip, vae, oracle_net, concept: str, rows: torch.Tensor, seeds: list[int]) -> float:
    """Oracle detection of `concept` in samples of its template with `rows` in the {} slot."""
    encoder = TextEncoders(host.text_encoder_specs(clip))
    positive = Prompts(clip, (TEMPLATES[category(concept)],)).encode(encoder, rows, [0])
    latents = host.sample(mp, positive, encoder.empty(), seeds, (4, world.SIZE // 8, world.SIZE // 8))
    return float(O.detects(oracle_net.predict(host.decode(vae, latents)), concept).float().mean())
