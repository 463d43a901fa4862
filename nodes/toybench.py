"""FMN_LoadToyBench: the shipped ToyBench world model as MODEL, CLIP and VAE."""
from __future__ import annotations

import folder_paths

from ..toybench import loader, world

PROMPTS = "; ".join(['"a portrait of Captain Zorb"', '"a star"', '"a moon in the style of neon"'])


class LoadToyBench:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = (
        "Loads ToyBench, a tiny trained text-to-image world shipped with the pack (32x32 images, SD1.5 "
        "layout built from ComfyUI's own classes) where forgetting can be measured. Concepts: identities "
        + ", ".join(world.IDENTITIES) + "; objects " + ", ".join(world.OBJECTS) + "; styles "
        + ", ".join(world.STYLES) + ". Prompts like " + PROMPTS
        + ". Use an Empty Latent Image of 32x32, euler, ~20 steps, CFG ~5."
    )
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The toy SD1.5-layout UNet (real attn2 key names): connect to Forget Train or KSampler.",
        "The toy SD1 text encoder (real tokenizer): connect to CLIP Text Encode or Forget Train.",
        "The toy VAE (4 latent channels, factor 8): connect to VAE Decode / VAE Encode.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return loader.load(embedding_directory=folder_paths.get_folder_paths("embeddings"))
