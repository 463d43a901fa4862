"""FMN_HardenForgetPatch: makes a forgetting hard to undo by textual inversion."""
from __future__ import annotations

from ..fmn_core import host
from ..fmn_core.concepts import parse_keep
from ..fmn_core.harden import HardenConfig, harden, progress_total
from ..fmn_core.latents import input_latents
from ..fmn_core.loss_plot import loss_plot
from ..fmn_core.merge import concepts_of
from ..fmn_core.patch import apply_patch
from .inversion import parse_templates

DEFAULTS = HardenConfig()
KEEP_TOOLTIP = ("Prompts and concepts to keep, comma- or line-separated: each item, and 'a photo of' / 'a painting "
                "of' it, is sampled from the model and must denoise as before. Hardening changes the UNet more "
                "widely than Forget Train, so name what you use: on ToyBench, with the world's other prompts here it "
                "kept 94-102 % of the other concepts.")
TEMPLATES_TOOLTIP = ("The phrasings the built-in attack uses, one per line with {} where its tokens go, taken in "
                     "turn by the rounds: use the ones your model is prompted with. Empty: each concept's first "
                     "template (its category's).")


class HardenForgetPatch:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Makes a forgetting hard to undo. In each round it plays the Recovery Attack (textual inversion "
                   "of the concept's images through the patched model), then trains a LoRA on the UNet's "
                   "transformer blocks so that the tokens it found, random tokens and the concept's own prompts "
                   "denoise the concept's images as the anchor's prompt does, while the model's own samples of "
                   "ordinary and kept prompts denoise as before. Outputs a second patch, applied after the forget "
                   "patch.")
    RETURN_TYPES = ("MODEL", "FORGET_PATCH", "IMAGE")
    RETURN_NAMES = ("model", "hardening_patch", "loss_plot")
    OUTPUT_TOOLTIPS = ("The input model with the forget patch and the hardening patch applied.",
                       "The hardening patch: save it, and apply it after the forget patch it hardens.",
                       "The distillation loss per step and its smoothed trend.")
    FUNCTION = "harden"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the forget patch was trained on, without the patch."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of that model."}),
                "patch": ("FORGET_PATCH", {"tooltip": "The forget patch to harden (Forget Train, Load Forget Patch)."}),
                "rounds": ("INT", {"default": DEFAULTS.rounds, "min": 1, "max": 20,
                                   "tooltip": "Attack-then-train rounds: each finds a new way back in and closes it. If Recovery "
                                              "Attack still brings the concept back, raise it with steps (ToyBench: Madame "
                                              "Plink 0.31-0.44 recovered with 3 rounds and 300 steps, 0.00 with the "
                                              "defaults)."}),
                "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 10000,
                                  "tooltip": "Training steps in all, split evenly over the rounds."}),
                "learning_rate": ("FLOAT", {"default": DEFAULTS.learning_rate, "min": 1e-6, "max": 0.5, "step": 1e-4,
                                            "round": False, "tooltip": "Adam learning rate of the hardening LoRA."}),
                "rank": ("INT", {"default": DEFAULTS.rank, "min": 1, "max": 64,
                                 "tooltip": "Rank of the hardening LoRA on each linear layer of the transformer blocks."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed for the samples, the attack, noise and timesteps."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Pictures of the concept (a one-concept patch). Without them, each "
                                                "concept's are sampled from the model, which still knows it."}),
                "vae": ("VAE", {"tooltip": "Encodes the images; needed when images are connected."}),
                "latent": ("LATENT", {"tooltip": "Already encoded pictures, instead of images."}),
                "keep": ("STRING", {"multiline": True, "default": "", "tooltip": KEEP_TOOLTIP}),
                "templates": ("STRING", {"multiline": True, "default": "", "tooltip": TEMPLATES_TOOLTIP}),
                "batch_size": ("INT", {"default": DEFAULTS.batch_size, "min": 1, "max": 64,
                                       "tooltip": "Concept samples per step, and as many kept-prompt samples: lower it "
                                                  "when memory is short."}),
                "inversion_steps": ("INT", {"default": DEFAULTS.inversion_steps, "min": 1, "max": 1000,
                                            "tooltip": "Steps of each round's attack: at least as many as the attack to resist "
                                                       "(Recovery Attack's steps). On ToyBench, 60-step rounds left moon "
                                                       "62 % recoverable by a 150-step attack; 150-step rounds, 0-19 %."}),
                "resolution": ("INT", {"default": DEFAULTS.resolution, "min": 32, "max": 2048, "step": 8,
                                       "tooltip": "Pixel size of the samples drawn when no images are given."}),
            },
        }

    def harden(self, model, clip, patch, rounds, steps, learning_rate, rank, seed, images=None, vae=None, latent=None,
               keep="", templates="", batch_size=DEFAULTS.batch_size, inversion_steps=DEFAULTS.inversion_steps,
               resolution=DEFAULTS.resolution):
        config = HardenConfig(rounds=rounds, steps=steps, learning_rate=learning_rate, rank=rank, seed=seed,
                              batch_size=batch_size, inversion_steps=inversion_steps, resolution=resolution,
                              keep=parse_keep(keep, concepts_of(patch)), templates=parse_templates(templates))
        latents = input_latents(model, images, vae, latent)
        progress = host.Progress(progress_total(config, len(patch.concepts), latents is not None))
        result = harden(model, clip, patch, latents, config, progress)
        patched = apply_patch(apply_patch(model, patch, 1.0), result.patch, 1.0)
        return (patched, result.patch, loss_plot(result.losses, "Harden Forget Patch"))
