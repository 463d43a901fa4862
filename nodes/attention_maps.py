"""FMN_AttentionMapViewer: where each word of a prompt steers cross-attention, before and after."""
from __future__ import annotations

from ..fmn_core import host
from ..fmn_core.attention_maps import MapSettings, attention_maps
from ..fmn_core.heatmaps import BLOCKS, COLORMAPS, NORMALIZATIONS, RESOLUTIONS

DEFAULTS = MapSettings()


class AttentionMapViewer:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Samples the prompt and shows, for each word, where in the image the model's cross-attention "
                   "looks (DAAM-style heatmaps summed over steps, layers and heads). Connect a patched model to "
                   "model_after to see the same seed before and after forgetting, side by side.")
    RETURN_TYPES = ("IMAGE", "IMAGE", "MASK")
    RETURN_NAMES = ("images", "overlays", "masks")
    OUTPUT_TOOLTIPS = ("The generated image (two when model_after is connected: before, after).",
                       "One heatmap overlay per word, for each model in turn.",
                       "One normalised heatmap per word (latent resolution), for each model in turn.")
    FUNCTION = "view"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = host.sampler_names()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to look into (SD1.x, SD2.x or SDXL)."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder."}),
                "vae": ("VAE", {"tooltip": "Decodes the image the maps are drawn over."}),
                "prompt": ("STRING", {"multiline": True, "default": "a painting of a fox in a snowy forest",
                                      "tooltip": "The prompt to sample; its words' attention is mapped."}),
                "words": ("STRING", {"default": "", "tooltip": "Comma-separated words to map; empty = every content word."}),
                "seed": ("INT", {"default": DEFAULTS.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Noise seed; model_after is sampled with the same noise."}),
                "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 10000, "tooltip": "Sampling steps, as in KSampler."}),
                "cfg": ("FLOAT", {"default": DEFAULTS.cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale, as in KSampler."}),
                "sampler_name": (samplers, {"default": DEFAULTS.sampler_name, "tooltip": "The host's sampler, as in KSampler."}),
                "scheduler": (schedulers, {"default": DEFAULTS.scheduler, "tooltip": "The host's noise schedule, as in KSampler."}),
                "width": ("INT", {"default": DEFAULTS.width, "min": 8, "max": 8192, "step": 8, "tooltip": "Image width in pixels."}),
                "height": ("INT", {"default": DEFAULTS.height, "min": 8, "max": 8192, "step": 8, "tooltip": "Image height in pixels."}),
            },
            "optional": {
                "model_after": ("MODEL", {"tooltip": "A second model (e.g. with a forget patch), sampled with the same seed and noise."}),
                "negative": ("STRING", {"default": DEFAULTS.negative, "tooltip": "Negative prompt (the unconditional side of CFG)."}),
                "start_percent": ("FLOAT", {"default": DEFAULTS.start_percent, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Keep attention from this point of the sampling run on."}),
                "end_percent": ("FLOAT", {"default": DEFAULTS.end_percent, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "... up to this point."}),
                "blocks": (list(BLOCKS), {"default": DEFAULTS.blocks, "tooltip": "Which UNet blocks' cross-attention to sum."}),
                "resolution": (list(RESOLUTIONS), {"default": DEFAULTS.resolution,
                                                   "tooltip": "Only layers at this fraction of the image side (1/8 is the latent grid)."}),
                "normalization": (list(NORMALIZATIONS), {"default": DEFAULTS.normalization,
                                                         "tooltip": "'per word': each map scaled to its own peak; 'across words': "
                                                                    "each pixel's attention shared out among the words."}),
                "colormap": (list(COLORMAPS), {"default": DEFAULTS.colormap, "tooltip": "Colours of the heatmap, low to high."}),
                "alpha": ("FLOAT", {"default": DEFAULTS.alpha, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "Opacity of the heatmap over the image."}),
            },
        }

    def view(self, model, clip, vae, prompt, words, seed, steps, cfg, sampler_name, scheduler, width, height,
             model_after=None, **options):
        settings = MapSettings(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                               width=width, height=height, **options)
        result = attention_maps(model, clip, vae, prompt, words, settings, model_after)
        files = host.preview_images(result.overlays, "fmn_attention")
        entries = [{**ref, "word": word, "model": label}
                   for ref, (label, word) in zip(files, [(l, w) for l in result.labels for w in result.words])]
        ui = {"images": host.preview_images(result.images, "fmn_attention_image"), "fmn_attention": entries}
        return {"ui": ui, "result": (result.images, result.overlays, result.masks)}
