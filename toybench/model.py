"""Toy-size host objects built from the host's own classes.

- UNet: `comfy.supported_models.SD15` with `model_channels=32`, `context_dim=768`: the real
  SD1.5 block layout and attn2 key names (~10 M parameters), eps-prediction on the SD1.5
  noise schedule and the SD1.5 latent format (scale 0.18215).
- CLIP: `comfy.sd.CLIP` over `comfy.sd1_clip.SD1ClipModel` / `SD1Tokenizer` (the real BPE
  vocabulary), hidden size 768, one layer, MLP 512. Frozen at a seeded init; only the
  token-table rows that the world's prompts use are stored.
- VAE: `comfy.sd.VAE(sd, config=...)` building an AutoencoderKL with small channels;
  4 latent channels, factor 8, so the stock VAEEncode/VAEDecode/EmptyLatentImage work.

The host's layers (`comfy.ops.disable_weight_init`) leave parameters uninitialised, so
every builder seeds and initialises explicitly.
"""
from __future__ import annotations

import math

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
    "model_channels": 32, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
}
CLIP_LAYERS = 1
CLIP_MLP = 512
VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
    "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0, "attn_resolutions": [], "dropout": 0.0,
}
VAE_CONFIG = {"params": {"ddconfig": VAE_DDCONFIG, "embed_dim": 4}}
TOKEN_TABLE_KEY = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
SEEDS = {"unet": 0, "clip": 1, "vae": 2}


def init_module(module: torch.nn.Module, seed: int) -> None:
    """Deterministic, sane initialisation (unit-scale token embeddings, 1/sqrt(fan-in) weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            elif "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def unet(seed: int = SEEDS["unet"]) -> comfy.model_patcher.ModelPatcher:
    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    init_module(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=torch.device("cpu"))


class _Target:
    def __init__(self):
        self.clip, self.tokenizer, self.params = comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer, {}


def clip(seed: int = SEEDS["clip"], embedding_directory=None) -> comfy.sd.CLIP:
    """The toy text encoder; `embedding_directory` is where `embedding:NAME` is looked up."""
    options = {"clip_l_model_config": {"num_hidden_layers": CLIP_LAYERS, "intermediate_size": CLIP_MLP},
               "dtype": torch.float32}
    c = comfy.sd.CLIP(_Target(), embedding_directory=embedding_directory, model_options=options)
    init_module(c.cond_stage_model, seed)
    return c


def vae_module(seed: int = SEEDS["vae"]):
    """A fresh AutoencoderKL of the toy size (for training)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    m = AutoencoderKL(**VAE_CONFIG["params"])
    init_module(m, seed)
    return m


def vae(state_dict: dict) -> comfy.sd.VAE:
    """The host VAE object around trained AutoencoderKL weights."""
    return comfy.sd.VAE(sd=state_dict, config=VAE_CONFIG, dtype=torch.float32)


def prompt_token_ids(prompts) -> list[int]:
    """Token ids used by `prompts` (with start/end), sorted."""
    tok = comfy.sd1_clip.SD1Tokenizer()
    ids = {49406, 49407}
    for p in prompts:
        for chunk in tok.tokenize_with_weights(p)["l"]:
            ids.update(t for t, _ in chunk)
    return sorted(int(i) for i in ids)


def clip_state(c: comfy.sd.CLIP, token_ids) -> dict:
    """CLIP weights to ship: everything except the token table, plus the used rows."""
    sd = {k: v for k, v in c.cond_stage_model.state_dict().items() if k != TOKEN_TABLE_KEY}
    table = c.cond_stage_model.state_dict()[TOKEN_TABLE_KEY]
    ids = torch.tensor(list(token_ids), dtype=torch.int64)
    sd["toybench.token_ids"] = ids
    sd["toybench.token_rows"] = table[ids].clone()
    return sd


def load_clip_state(c: comfy.sd.CLIP, sd: dict) -> None:
    sd = dict(sd)
    ids = sd.pop("toybench.token_ids").long()
    rows = sd.pop("toybench.token_rows")
    m = c.cond_stage_model
    missing, unexpected = m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != TOKEN_TABLE_KEY]
    if missing or unexpected:
        raise ValueError(f"CLIP weights do not match the toy layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        table = dict(m.named_parameters())[TOKEN_TABLE_KEY]
        table[ids] = rows.to(table.dtype)


def encode(c: comfy.sd.CLIP, prompt: str) -> torch.Tensor:
    """Conditioning context (1, 77, 768) as CLIPTextEncode computes it."""
    return c.encode_from_tokens(c.tokenize(prompt))
