"""The one adapter between the engine and the ComfyUI host.

Everything that touches host objects (ModelPatcher, CLIP, the LoRA key map, progress,
interrupt) lives here, behind small functions with plain tensor/dataclass results, so the
rest of `fmn_core` reads without ComfyUI. Only APIs that have stayed stable across host
releases are used: ModelPatcher's clone / add_patches / add_weight_wrapper /
set_model_attn2_replace, `comfy.sd.load_lora_for_models`, `comfy.utils.ProgressBar` and
`comfy.model_management`'s load and interrupt helpers.

A package with one module per part of the host, every public name importable from
`fmn_core.host` as before: `model.py` (layers, family, fingerprint, device, sampling
schedule, latent space), `unet.py` (attn2 replaces, the trainable clone, the forward),
`text.py` (tokens, embeddings, encodings, text encoder copies), `sampling.py`
(conditioning, KSampler's sampling, the VAE, previews, CLIP vision), `patches.py` (LoRA
key maps and application, checkpoint tensors) and `progress.py`.
"""
from __future__ import annotations

from .model import (ATTN2_NAME, BLOCK_NAMES, VAE_FACTOR, Attn2Layer, attn2_layers, device, model_arch, model_fingerprint,
                    model_sampling, percent_to_sigma, process_latent_in, process_latent_out, weight_shapes)
from .patches import apply_lora, checkpoint_state_dict, clip_lora_shapes, lora_key_map
from .progress import Progress
from .sampling import conditioning, decode, preview_images, sample, sample_latent, sampler_names, vae_encode, vision_embeds
from .text import (check_embeddings, checked_tokens, embedding_references, encode, encode_many, encode_pooled,
                   special_tokens, text_encoder_specs, text_encoder_state, tokenize)
from .unet import AttnReplace, existing_attn2_replace, loaded_forward, register_attn2, trainable_unet, unet_blocks, unet_forward

__all__ = [
    "ATTN2_NAME", "BLOCK_NAMES", "VAE_FACTOR", "Attn2Layer", "attn2_layers", "device", "model_arch", "model_fingerprint",
    "model_sampling", "percent_to_sigma", "process_latent_in", "process_latent_out", "weight_shapes",
    "apply_lora", "checkpoint_state_dict", "clip_lora_shapes", "lora_key_map", "Progress",
    "conditioning", "decode", "preview_images", "sample", "sample_latent", "sampler_names", "vae_encode", "vision_embeds",
    "check_embeddings", "checked_tokens", "embedding_references", "encode", "encode_many", "encode_pooled",
    "special_tokens", "text_encoder_specs", "text_encoder_state", "tokenize",
    "AttnReplace", "existing_attn2_replace", "loaded_forward", "register_attn2", "trainable_unet", "unet_blocks",
    "unet_forward",
]
