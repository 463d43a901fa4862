"""Small diffusers pipelines whose UNets have the layouts of host_models' (and ToyBench's).

Built from configs with random weights, nothing downloaded: the CLIP tokenizer is read
from the BPE vocabulary the host ships (`comfy/sd1_tokenizer`), the text encoders and the
VAE are one-layer stand-ins (a LoRA of the UNet never touches them). Each UNet's attn2
layers correspond one to one to the host model's, as `comfy.utils.unet_to_diffusers`
maps them: same levels, two layers per level, the same transformer depths and widths.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch

import comfy.sd1_clip
import host_models as hm

TOKENIZER = Path(comfy.sd1_clip.__file__).resolve().parent / "sd1_tokenizer"  # where the host's SD1 tokenizer reads it
TEXT_WIDTH = 32  # the stand-in text encoders' width: only the UNet's cross-attention width matters here


def _levels(config: dict) -> list[bool]:
    """Whether each level of a host UNet config has cross-attention (its first layer's depth)."""
    return [config["transformer_depth"][2 * level] > 0 for level in range(len(config["channel_mult"]))]


def _unet(config: dict, heads: tuple[int, ...], **extra):
    """A diffusers UNet with the host config's levels, widths, depths and context width."""
    from diffusers import UNet2DConditionModel

    attends = _levels(config)
    depths = tuple(max(1, config["transformer_depth"][2 * level]) for level in range(len(attends)))
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, layers_per_block=2, norm_num_groups=32,
        block_out_channels=tuple(config["model_channels"] * m for m in config["channel_mult"]),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        transformer_layers_per_block=depths, cross_attention_dim=config["context_dim"], attention_head_dim=heads,
        use_linear_projection=config["use_linear_in_transformer"], **extra)


def _text_encoder(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                            projection_dim=TEXT_WIDTH, vocab_size=49408)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _parts() -> dict:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4)
    tokenizer = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"))
    return {"vae": vae, "tokenizer": tokenizer, "scheduler": EulerDiscreteScheduler(steps_offset=1),
            "text_encoder": _text_encoder()}


def _heads(config: dict) -> tuple[int, ...]:
    """Heads per level: the host's fixed head count, or its fixed head width."""
    if "num_heads" in config:
        return (config["num_heads"],) * len(config["channel_mult"])
    return tuple(config["model_channels"] * m // config["num_head_channels"] for m in config["channel_mult"])


def sd_pipeline(config: dict):
    """StableDiffusionPipeline (SD1.x and SD2.x) around a UNet of the host config's layout."""
    from diffusers import StableDiffusionPipeline

    with _quiet():
        return StableDiffusionPipeline(unet=_unet(config, _heads(config)), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **_parts())


def sdxl_pipeline(config: dict = hm.SDXL_UNET):
    """StableDiffusionXLPipeline around a UNet of the host's small SDXL layout."""
    from diffusers import StableDiffusionXLPipeline

    parts = _parts()
    with _quiet():
        unet = _unet(config, _heads(config), addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=config["adm_in_channels"])
        return StableDiffusionXLPipeline(unet=unet, text_encoder_2=_text_encoder(True), tokenizer_2=parts["tokenizer"],
                                         **parts)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers logs every config default it fills in; these configs are partial on purpose."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
