"""Small models of the real SD1.x / SD2.x / SDXL architectures, built from the host's own classes.

The host's layers (`comfy.ops.disable_weight_init`) leave parameters uninitialised, so
every builder seeds and initialises explicitly. The text encoder is initialised so that
token contexts are distinct (unit-scale token embeddings, small position embeddings,
1/sqrt(fan-in) weights, unit-norm layer norms): with a careless init every word's context
is nearly the same and attention tests mean little.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.text_encoders.sd2_clip as sd2_clip_module
import comfy.supported_models
from fmn_pack.toybench.model import UNET_CONFIG as SD15_UNET
from fmn_pack.toybench.model import init_module

SD2_UNET = {**{k: v for k, v in SD15_UNET.items() if k != "num_heads"},
            "model_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64}

# SDXL's layout (no attention in the first level, two transformer blocks per block in the
# deepest, linear projections, 2048-d context = CLIP-L 768 + CLIP-G 1280, the 2816-d
# vector conditioning) at 64 channels instead of 320 and depth 2 instead of 10.
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 64, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 2, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 32, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
             "use_temporal_attention": False, "use_temporal_resblock": False}


def _patcher(model_config, seed: int) -> comfy.model_patcher.ModelPatcher:
    model = model_config.get_model({})
    init_module(model.diffusion_model, seed)
    model.diffusion_model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def sd15_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SD1.5 block layout, real attn2 key names, ~10 M parameters."""
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config, seed)


def sd2_model(seed: int = 0, v_prediction: bool = True) -> comfy.model_patcher.ModelPatcher:
    """SD2.x block layout (linear projections, 64-d heads, 1024-d context)."""
    config = comfy.supported_models.SD20(dict(SD2_UNET))
    config.set_inference_dtype(torch.float32, None)
    if v_prediction:
        config.model_type = lambda state_dict, prefix="": comfy.model_base.ModelType.V_PREDICTION
    return _patcher(config, seed)


def sdxl_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SDXL block layout and vector conditioning, real attn2 key names, ~47 M parameters."""
    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    config.set_inference_dtype(torch.float32, None)
    return _patcher(config, seed)


class _Target:
    def __init__(self, clip, tokenizer):
        self.clip, self.tokenizer, self.params = clip, tokenizer, {}


def _clip(clip_cls, tok_cls, config_keys: str | tuple[str, ...], layers: int, seed: int, embedding_directory=None) -> comfy.sd.CLIP:
    keys = (config_keys,) if isinstance(config_keys, str) else config_keys
    options = {**{key: {"num_hidden_layers": layers, "intermediate_size": 512} for key in keys}, "dtype": torch.float32}
    clip = comfy.sd.CLIP(_Target(clip_cls, tok_cls), embedding_directory=embedding_directory, model_options=options)
    init_module(clip.cond_stage_model, seed)
    return clip


def sd1_clip(seed: int = 1, layers: int = 2, embedding_directory=None) -> comfy.sd.CLIP:
    """The host's SD1 CLIP-L path with the real tokenizer and a shallow encoder."""
    return _clip(comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer, "clip_l_model_config", layers, seed, embedding_directory)


def sd2_clip(seed: int = 1, layers: int = 3, embedding_directory=None) -> comfy.sd.CLIP:
    """The host's SD2 CLIP-H path (pads with 0, 1024-d)."""
    return _clip(sd2_clip_module.SD2ClipModel, sd2_clip_module.SD2Tokenizer, "clip_h_model_config", layers, seed, embedding_directory)


def sdxl_clip(seed: int = 1, layers: int = 3, embedding_directory=None) -> comfy.sd.CLIP:
    """The host's SDXL pair: CLIP-L (pads with the end token) and CLIP-G (pads with 0, pooled
    projection), both shallow; at least 3 layers, as both read their penultimate layer."""
    return _clip(comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, ("clip_l_model_config", "clip_g_model_config"),
                 layers, seed, embedding_directory)
