"""FMN_ConceptInversion: learn new token rows for a concept from its images."""
from __future__ import annotations

import folder_paths

from ..fmn_core import host
from ..fmn_core.embedding import Embedding, describe, embedding_filename, save_embedding
from ..fmn_core.files import inside
from ..fmn_core.inversion import DEFAULT_TEMPLATE, InversionConfig, invert
from ..fmn_core.latents import input_latents
from ..fmn_core.loss_plot import loss_plot
from .memory_inputs import memory_inputs
from .checkpoint_inputs import NO_RESUME, checkpoints, resume_input, resume_path, save_every_input

DEFAULTS = InversionConfig()
FOLDER = "embeddings"
TEMPLATE_TOOLTIP = ("Prompt templates, one per line, each with one {} where the learned tokens go; training "
                    "cycles through them. Use the phrasing your model knows for this kind of concept.")


def parse_templates(text: str) -> tuple[str, ...]:
    """The template box: one template per non-empty line."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def settings_inputs() -> dict:
    """num_tokens, steps, learning_rate and seed: the inversion settings both nodes expose."""
    return {
        "num_tokens": ("INT", {"default": DEFAULTS.num_tokens, "min": 1, "max": 16,
                               "tooltip": "How many new tokens (the paper uses 4)."}),
        "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 10000, "tooltip": "Inversion steps."}),
        "learning_rate": ("FLOAT", {"default": DEFAULTS.learning_rate, "min": 1e-6, "max": 0.5, "step": 1e-4,
                                    "round": False, "tooltip": "AdamW learning rate of the token vectors."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "Seed for images, timesteps and noise: the same seed gives the same result."}),
    }


class ConceptInversion:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Textual inversion: learns a few new token vectors that make the model reproduce the given "
                   "images, with the model frozen. Saves them to models/embeddings/<name>.safetensors, so "
                   "'embedding:<name>' works in any prompt, and Forget Train can then forget exactly those tokens.")
    RETURN_TYPES = ("EMBEDDING", "STRING", "IMAGE")
    RETURN_NAMES = ("embedding", "prompt_word", "loss_plot")
    OUTPUT_TOOLTIPS = ("The learned token vectors.",
                       "'embedding:<name>': put it in a prompt or a Forget Train concept line.",
                       "The inversion loss per step and its smoothed trend: connect a Preview Image to see it converge.")
    FUNCTION = "invert"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the embedding is learned through (frozen)."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder (SD1.x, SD2.x or SDXL; SDXL embeddings hold rows for both encoders)."}),
                "init_text": ("STRING", {"default": "Van Gogh", "tooltip": "The concept's words: the new tokens start from them."}),
                "name": ("STRING", {"default": "my_concept", "tooltip": "File name in models/embeddings (.safetensors is added)."}),
                **settings_inputs(),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Images of the concept (one size; cropped to multiples of 8 like VAE Encode)."}),
                "vae": ("VAE", {"tooltip": "Encodes the images."}),
                "latent": ("LATENT", {"tooltip": "Already encoded images, instead of images + VAE."}),
                "templates": ("STRING", {"multiline": True, "default": DEFAULT_TEMPLATE, "tooltip": TEMPLATE_TOOLTIP}),
                "batch_size": ("INT", {"default": DEFAULTS.batch_size, "min": 1, "max": 64, "tooltip": "Images per step."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an embedding file of the same name."}),
                "save_every": save_every_input("embedding", FOLDER),
                "resume_from": resume_input(FOLDER),
                **memory_inputs(),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, name=None, templates=None, **_):
        try:
            if isinstance(name, str):
                embedding_filename(name)
            if isinstance(templates, str):
                config_from(templates).validate()
        except ValueError as e:
            return str(e)
        return True

    def invert(self, model, clip, init_text, name, num_tokens, steps, learning_rate, seed, images=None, vae=None,
               latent=None, templates=DEFAULT_TEMPLATE, batch_size=DEFAULTS.batch_size, overwrite=False, save_every=0,
               resume_from=NO_RESUME, precision=DEFAULTS.precision, gradient_checkpointing=DEFAULTS.gradient_checkpointing):
        config = config_from(templates, num_tokens=num_tokens, steps=steps, learning_rate=learning_rate, seed=seed,
                             batch_size=batch_size, precision=precision, gradient_checkpointing=gradient_checkpointing)
        config.validate()
        path = inside(folder_paths.get_folder_paths(FOLDER)[0], embedding_filename(name))
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path.name} already exists in {path.parent}: pick another name or enable overwrite")
        samples = input_latents(model, images, vae, latent)
        result = invert(model, clip, samples, init_text, config, progress=host.Progress(steps),
                        checkpoints=checkpoints(FOLDER, save_every, path.stem), resume=resume_path(FOLDER, resume_from))
        embedding = Embedding(path.stem, result.vectors, result.layout, describe(init_text, config, result.losses))
        save_embedding(embedding, path, overwrite=overwrite)
        word = f"embedding:{path.stem}"
        return {"ui": {"text": [f"saved {path.name}: use {word} in a prompt"]}, "result": (embedding, word, loss_plot(result.losses, "Concept Inversion"))}


def config_from(template_text: str, **settings) -> InversionConfig:
    return InversionConfig(templates=parse_templates(template_text), **settings)
