"""Redirects (a concept forgotten towards another concept's images) and the anchor floor
(how often the original model already draws each object for the object anchor's prompts)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from .runs import one_run, rates, score

# Redirects (concept, its category, the anchor that replaces it, the concept the oracle
# should then see): one per category.
REDIRECTS = (("star", "object", "a ring", "ring"), ("Captain Zorb", "identity", "Madame Plink", "Madame Plink"),
             ("zebra", "style", "checkers", "checkers"))
# docs/quality.md's redirect settings: the output term must pull the concept's prompts all the
# way to the replacement (the defaults, 150 steps at weight 10, reached 0.64 / 0.06 / 0.70).
# Mode `token rows` redirects at its defaults: its warm start already reads the concept's
# words as the replacement's.
REDIRECT_RECIPES = {"output weight 100, 400 steps, lr 0.05": {"output_weight": 100.0, "steps": 400, "learning_rate": 0.05},
                    "token rows": {"mode": "token rows"}}


@dataclass(frozen=True)
class Probe:
    """A prompt scored for every object concept (toy_train.detection_rates' scene interface)."""

    prompt: str
    concepts: tuple[str, ...]
    identity: bool = False


def anchor_floor(toy, oracle_net, seeds: list[int]) -> dict[str, dict[str, float]]:
    """How often the original model's samples of the object anchor's prompts already show
    each object: a patch that makes an object's prompts denoise like the anchor's cannot
    erase it below this (the generator draws these prompts as a plain block, no object)."""
    import torch
    from fmn_pack.toybench import train as toy_train, world
    mp, clip, vae = toy
    out = {}
    with torch.inference_mode():
        for prompt in ("an object", "an object in the style of"):
            rates = toy_train.detection_rates(mp, clip, vae, oracle_net, seeds, seeds, scenes=[Probe(prompt, world.OBJECTS)])
            out[prompt] = {c: round(v, 3) for c, v in rates.items()}
            print(f"anchor floor {prompt!r}: {json.dumps(out[prompt])}", flush=True)
    return out


def redirect_report(toy, oracle_net, seeds: tuple[list[int], list[int]], seed: int, base: dict,
                    recipes: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Recipe name -> each REDIRECTS line trained with the replacement's images (the
    recipe's ForgetConfig fields); detection of the replacement and of the concept on every
    prompt that names the concept, and the other concepts' detection after / before
    (`base`) on their own prompts."""
    from fmn_pack.toybench import world
    out = {}
    for name, recipe in recipes.items():
        for concept, category, anchor, replacement in REDIRECTS:
            line = f"{concept} | {category} | anchor={anchor}"
            run = one_run(toy, [line], recipe, seed, images_of=[replacement])
            scenes = [Probe(s.prompt, (concept, replacement), bool(s.identity)) for s in world.scenes_for(concept)]
            seen = rates(run["patched"], toy, oracle_net, seeds, scenes, run["clip"])
            kept = score(base, rates(run["patched"], toy, oracle_net, seeds, clip=run["clip"]), [concept, replacement])["kept"]
            out.setdefault(name, {})[line] = {
                "replacement": replacement, "replacement_detected": round(seen[replacement], 3),
                "concept_detected": round(seen[concept], 3), "kept": round(kept, 3), "prompts": len(scenes),
                "seconds": round(run["seconds"], 1), "settings": recipe}
            print(f"redirect ({name}) {line!r}: {json.dumps(out[name][line])}", flush=True)
    return out
