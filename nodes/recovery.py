"""FMN_RecoveryAttack: tries to bring a forgotten concept back by textual inversion."""
from __future__ import annotations

from ..fmn_core import host
from ..fmn_core.concepts import parse_concepts
from ..fmn_core.inversion import DEFAULT_TEMPLATE
from ..fmn_core.latents import input_latents
from ..fmn_core.recovery import attack
from .inversion import TEMPLATE_TOOLTIP, config_from, settings_inputs
from .mscore import INIT_TOOLTIP

CONCEPT_TOOLTIP = ("The forgotten concept as a Forget Train line ('Captain Zorb | identity', 'star | object | "
                   "anchor=a ring'): its words and its anchor make the two prompts the judge compares.")


class RecoveryAttack:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Robustness check: inverts the concept's images into new tokens through the patched model (as an "
                   "attacker with the patch would), samples the template with them, and reports how often those "
                   "samples show the concept. The judge is the original model as a diffusion classifier: a sample "
                   "shows the concept when it denoises better under the concept's prompt than under the anchor's.")
    RETURN_TYPES = ("FLOAT", "LATENT", "STRING")
    RETURN_NAMES = ("recovered_rate", "samples", "report")
    OUTPUT_TOOLTIPS = ("Share of the recovered tokens' samples the judge says show the concept (lower = harder to undo).",
                       "The recovered tokens' samples: connect VAE Decode to look at them.",
                       "The rates of the recovered tokens and of the concept's own prompt through both models.")
    FUNCTION = "attack"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "original": ("MODEL", {"tooltip": "The model before forgetting: the judge."}),
                "patched": ("MODEL", {"tooltip": "The model after forgetting: the one attacked."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the original model (and of the patched one, unless "
                                             "patched_clip is connected)."}),
                "concept": ("STRING", {"default": "Van Gogh | style", "tooltip": CONCEPT_TOOLTIP}),
                "init_text": ("STRING", {"default": "thing", "tooltip": INIT_TOOLTIP}),
                **settings_inputs(),
                "samples": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Images sampled from the recovered tokens."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Images of the concept: the attacker's data."}),
                "vae": ("VAE", {"tooltip": "Encodes the images."}),
                "latent": ("LATENT", {"tooltip": "Already encoded images, instead of images + VAE."}),
                "templates": ("STRING", {"multiline": True, "default": DEFAULT_TEMPLATE, "tooltip": TEMPLATE_TOOLTIP
                                         + " The first one is also what is sampled and judged."}),
                "patched_clip": ("CLIP", {"tooltip": "The text encoder that goes with the patched model, where the "
                                                     "patch edited it (mode 'token rows': Forget Train's clip output). "
                                                     "Empty: clip."}),
            },
        }

    def attack(self, original, patched, clip, concept, init_text, num_tokens, steps, learning_rate, seed, samples,
               images=None, vae=None, latent=None, templates=DEFAULT_TEMPLATE, patched_clip=None):
        config = config_from(templates, num_tokens=num_tokens, steps=steps, learning_rate=learning_rate, seed=seed)
        config.validate()
        (line, *more) = parse_concepts(concept)
        if more:
            raise ValueError("Recovery Attack takes one concept line: attack each forgotten concept in its own node")
        latents = input_latents(original, images, vae, latent)
        if latents is None:
            raise ValueError("Recovery Attack needs the concept's images (with a VAE) or a latent: connect one")
        result = attack(original, patched, clip, latents, line.text, line.anchor, config, init_text,
                        [seed + i for i in range(samples)], progress=host.Progress(steps), patched_clip=patched_clip)
        report = (f"Recovery attack on {line.text!r} (judge: the original model, concept prompt against anchor "
                  f"{line.anchor!r})\n\n| samples of | judged to show the concept |\n|---|---|\n"
                  f"| the recovered tokens, patched model | {result.rate:.2f} |\n"
                  f"| the concept's prompt, patched model | {result.prompt_rate:.2f} |\n"
                  f"| the concept's prompt, original model | {result.original_rate:.2f} |\n\n"
                  f"inversion: {num_tokens} tokens from {init_text!r}, {steps} steps, lr {learning_rate}, seed {seed}, "
                  f"final loss {result.final_loss:.4f}")
        return {"ui": {"text": [report]}, "result": (result.rate, {"samples": result.samples}, report)}
