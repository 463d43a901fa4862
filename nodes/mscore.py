"""FMN_MScore: how much of a concept each model still holds (the paper's M-Score)."""
from __future__ import annotations

from ..fmn_core import host
from ..fmn_core.inversion import DEFAULT_TEMPLATE
from ..fmn_core.latents import input_latents
from ..fmn_core.mscore import m_scores, table
from .inversion import TEMPLATE_TOOLTIP, config_from, settings_inputs

EXTRA_MODELS = ("patched_2", "patched_3")
INIT_TOOLTIP = ("A neutral word every inversion starts from, not the concept itself: a model that still holds the "
                "concept pulls the tokens towards it, a model that forgot cannot. Started from the concept's own "
                "words, a patched model would keep them by not moving them. Keep it the same between comparisons.")


class MScore:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("M-Score: inverts the concept's images through the original model and through each patched "
                   "model with the same settings, and scores how close the recovered tokens stay to the concept's "
                   "own words (cosine; higher = more held). A forgotten concept scores lower after the patch. "
                   "Definition: docs/mscore.md.")
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("original_score", "patched_score", "drop", "report")
    OUTPUT_TOOLTIPS = ("M-Score through the original model.",
                       "M-Score through the (first) patched model; equals the original's when none is connected.",
                       "original_score - patched_score: how much of the concept the patch removed.",
                       "Every model's score, drop and inversion loss, with the settings, as a table.")
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        optional_models = {name: ("MODEL", {"tooltip": "Another patched model to score."}) for name in EXTRA_MODELS}
        return {
            "required": {
                "original": ("MODEL", {"tooltip": "The model before forgetting: the reference."}),
                "clip": ("CLIP", {"tooltip": "The text encoder shared by the models (SD1.x, SD2.x or SDXL)."}),
                "concept": ("STRING", {"default": "Van Gogh", "tooltip": "The concept's words: the recovered tokens are "
                                                                          "compared with them."}),
                "init_text": ("STRING", {"default": "thing", "tooltip": INIT_TOOLTIP}),
                **settings_inputs(),
            },
            "optional": {
                "patched": ("MODEL", {"tooltip": "The model after forgetting."}),
                **optional_models,
                "images": ("IMAGE", {"tooltip": "Images of the concept (the anchors)."}),
                "vae": ("VAE", {"tooltip": "Encodes the images; also decodes samples for the image-space score."}),
                "latent": ("LATENT", {"tooltip": "Already encoded anchor images, instead of images + VAE."}),
                "templates": ("STRING", {"multiline": True, "default": DEFAULT_TEMPLATE, "tooltip": TEMPLATE_TOOLTIP
                                         + " The first one is also where the representations are compared."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "Adds an image-space score: CLIP-vision similarity of images "
                                                          "sampled from each recovered embedding to the anchors."}),
            },
        }

    def score(self, original, clip, concept, init_text, num_tokens, steps, learning_rate, seed, patched=None, images=None,
              vae=None, latent=None, templates=DEFAULT_TEMPLATE, clip_vision=None, **extra):
        config = config_from(templates, num_tokens=num_tokens, steps=steps, learning_rate=learning_rate, seed=seed)
        config.validate()
        models = [("original", original)] + [(name, m) for name, m in [("patched", patched)]
                                             + [(n, extra.get(n)) for n in EXTRA_MODELS] if m is not None]
        samples = input_latents(original, images, vae, latent)
        if samples is None:
            raise ValueError("M-Score needs the concept's images (with a VAE) or a latent: connect one")
        rows = m_scores(models, clip, samples, concept, config, init_text, vision=clip_vision, vae=vae,
                        progress=host.Progress(steps * len(models)))
        report = table(rows, concept, config, init_text)
        second = rows[1] if len(rows) > 1 else rows[0]
        return {"ui": {"text": [report]}, "result": (rows[0].score, second.score, second.drop, report)}
