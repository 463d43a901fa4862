"""The one adapter between the engine and the ComfyUI host.

Everything that touches host objects (ModelPatcher, CLIP, the LoRA key map, progress,
interrupt) lives here, behind small functions with plain tensor/dataclass results, so the
rest of `fmn_core` reads without ComfyUI. Only APIs that have stayed stable across host
releases are used: ModelPatcher's clone / add_patches / add_weight_wrapper /
set_model_attn2_replace, `comfy.sd.load_lora_for_models`, `comfy.utils.ProgressBar` and
`comfy.model_management`'s load and interrupt helpers.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .safetensors_check import load_checked

ATTN2_NAME = re.compile(
    r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?\d+\.transformer_blocks\.(\d+)\.attn2$"
)
VAE_FACTOR = 8  # pixels per latent cell in the SD1.x / SD2.x / SDXL latent spaces
BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


@dataclass(frozen=True)
class Attn2Layer:
    """One UNet cross-attention layer, named the way the host names it."""

    module: str  # e.g. "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2"
    block: tuple[str, int, int]  # attn2 replace key: (block name, block id, transformer index)
    heads: int
    dim_head: int
    context_dim: int

    def weight_key(self, projection: str) -> str:
        return f"{self.module}.{projection}.weight"


def attn2_layers(patcher) -> list[Attn2Layer]:
    """Find every cross-attention layer of a host UNet, in execution order."""
    layers = []
    for name, module in patcher.model.named_modules():
        match = ATTN2_NAME.match(name)
        if match is None:
            continue
        kind, block_id, index = match.groups()
        number = 0 if kind == "middle_block" else int(block_id)
        block = (BLOCK_NAMES[kind], number, int(index))
        heads = module.heads
        layers.append(Attn2Layer(name, block, heads, module.to_k.out_features // heads, module.to_k.in_features))
    if not layers:
        raise ValueError(
            f"no UNet cross-attention layers found in model type {model_arch(patcher)}: "
            "Forget-Me-Not supports the SD1.x, SD2.x and SDXL UNet families (DiT models such as SD3, Flux or PixArt "
            "have no such layers)"
        )
    return layers


def model_arch(patcher) -> str:
    """The host's name for the model family (its supported_models config class)."""
    return type(patcher.model.model_config).__name__


def model_fingerprint(patcher, layers: list[Attn2Layer]) -> str:
    """A short hash of the base weights the patch was trained on (first layer's to_k).

    Informational: patches transfer across fine-tunes of one architecture, so this is
    recorded, not enforced.
    """
    weight = patcher.get_model_object(layers[0].weight_key("to_k"))
    data = weight.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def weight_shapes(patcher, keys: list[str]) -> dict[str, tuple[int, ...]]:
    state = patcher.model.state_dict()
    return {k: tuple(state[k].shape) for k in keys if k in state}


# --- text -------------------------------------------------------------------------


def checked_tokens(clip, text: str) -> dict:
    """`clip.tokenize(text)` after checking every `embedding:NAME` in it (`check_embeddings`)."""
    check_embeddings(clip, text)
    return clip.tokenize(text)


def tokenize(clip, text: str) -> list[list]:
    """Token chunks of the prompt as the UNet context will see them (ints or embedding tensors).

    SDXL's two encoders (clip_l and clip_g) each tokenize the prompt, and their outputs are
    joined feature-wise, so a context position is the same token in both: the streams are
    checked to hold the same words at the same positions (they differ only in padding),
    and the first one locates tokens for the joined context.
    """
    tokens = checked_tokens(clip, text)
    streams = {key: [[entry[0] for entry in chunk] for chunk in chunks] for key, chunks in tokens.items()}
    tokenizers = _tokenizers(clip)
    layouts = {key: _layout(chunks, tokenizers.get(key)) for key, chunks in streams.items()}
    first = sorted(streams)[0]
    differing = [key for key, layout in layouts.items() if layout != layouts[first]]
    if differing:
        raise ValueError(f"the text encoders {first} and {', '.join(differing)} split {text[:60]!r} into different tokens, "
                         "so the concept's positions are ambiguous: rephrase the prompt or concept")
    return streams[first]


def _layout(chunks: list[list], tokenizer) -> list[tuple]:
    """(chunk, position, token) of every word token: what must agree between encoders
    (an embedding's rows differ in width per encoder, so only its place counts)."""
    markers = {getattr(tokenizer, name, None) for name in ("start_token", "end_token", "pad_token")} - {None}
    return [(c, i, "embedding" if isinstance(t, torch.Tensor) else t)
            for c, chunk in enumerate(chunks) for i, t in enumerate(chunk)
            if isinstance(t, torch.Tensor) or t not in markers]


def _tokenizers(clip) -> dict[str, object]:
    """The host's per-encoder tokenizers, keyed like its token streams ("l", "h", "g")."""
    tokenizer = clip.tokenizer
    if hasattr(tokenizer, "clip"):  # one encoder: SD1 (clip_l), SD2 (clip_h)
        return {tokenizer.clip_name: getattr(tokenizer, tokenizer.clip)}
    return {name[len("clip_"):]: inner for name, inner in vars(tokenizer).items()
            if name.startswith("clip_") and hasattr(inner, "tokenize_with_weights")}


def _inner_tokenizer(clip):
    """The tokenizer of the first token stream: the one `tokenize` locates tokens with."""
    tokenizers = _tokenizers(clip)
    if not tokenizers:
        raise ValueError(f"tokenizer {type(clip.tokenizer).__name__} is not a CLIP tokenizer this pack knows "
                         "(SD1.x, SD2.x, SDXL)")
    return tokenizers[sorted(tokenizers)[0]]


def embedding_references(clip, text: str) -> list[tuple[str, str | None]]:
    """(name, file) for every `embedding:NAME` the host's tokenizer will look up in `text`,
    the file chosen as its loader chooses (None: not found). Mirrors
    `SDTokenizer.tokenize_with_weights` and `load_embed`, which offer no lookup of their own."""
    import comfy.sd1_clip as sd1

    inner = _inner_tokenizer(clip)
    directories = getattr(inner, "embedding_directory", None)
    if directories is None:
        return []
    ident = inner.embedding_identifier
    references = []
    for segment, _ in sd1.token_weights(sd1.escape_important(text), 1.0):
        words = re.split(" {0}|\n{0}".format(ident), sd1.unescape_important(segment))
        for word in [words[0]] + [ident + w for w in words[1:]]:
            if not word.startswith(ident):
                continue
            names = word[len(ident):].strip("\n").split()[:1]
            if not names:
                raise ValueError(f"{ident} without a name in {text!r}: write {ident}NAME")
            name = names[0]
            path = _embedding_file(name, directories)
            if path is None and name.strip(",") != name:  # the host's second try
                name = name.strip(",")
                path = _embedding_file(name, directories)
            references.append((name, path))
    return references


def _embedding_file(name: str, directories) -> str | None:
    import comfy.sd1_clip as sd1

    for folder in sd1.expand_directory_list([directories] if isinstance(directories, str) else directories):
        folder = os.path.abspath(folder)
        path = os.path.abspath(os.path.join(folder, name))
        try:
            if os.path.commonpath((folder, path)) != folder:
                continue
        except ValueError:
            continue
        for candidate in (path, path + ".safetensors", path + ".pt", path + ".bin"):
            if os.path.isfile(candidate):
                return candidate
    return None


_CHECKED_EMBEDDINGS: dict[tuple, None] = {}


def check_embeddings(clip, text: str) -> None:
    """Refuse, with the file and the fix, any embedding `text` names that the pack cannot
    trust: missing, pickle-based (.pt/.bin: never unpickled), malformed, non-finite, or
    made for another text encoder width. The host itself skips such files with a log line
    and drops the words, which would silently change what a node trains or measures."""
    references = embedding_references(clip, text)
    for inner in _tokenizers(clip).values():
        _check_embeddings_for(inner, references)


def _check_embeddings_for(inner, references: list[tuple[str, str | None]]) -> None:
    """`check_embeddings` for one encoder's tokenizer (SDXL embeddings hold rows for both)."""
    width, key = getattr(inner, "embedding_size", None), getattr(inner, "embedding_key", None)
    for name, path in references:
        if path is None:
            raise ValueError(f"embedding:{name} was not found in the embeddings folder(s) {inner.embedding_directory}: "
                             f"put {name}.safetensors there or correct the name")
        stat = os.stat(path)
        token = (path, stat.st_mtime_ns, stat.st_size, width, key)
        if token in _CHECKED_EMBEDDINGS:
            continue
        tensors, _ = load_checked(path, "embedding")
        rows = tensors.get(key, next(iter(tensors.values()), None))
        if rows is None or rows.ndim == 0 or rows.shape[-1] != width or rows.numel() == 0:
            shape = None if rows is None else tuple(rows.shape)
            raise ValueError(f"embedding:{name} ({os.path.basename(path)}) holds {shape}, not rows of width {width} for "
                             f"this text encoder ({key}): it was made for another model family")
        _CHECKED_EMBEDDINGS[token] = None


def special_tokens(clip) -> dict[str, int | None]:
    inner = _inner_tokenizer(clip)
    return {
        "start": getattr(inner, "start_token", None),
        "end": getattr(inner, "end_token", None),
        "pad": getattr(inner, "pad_token", None),
        "chunk": getattr(inner, "max_length", 77),
    }


def text_encoder_state(clip) -> tuple[torch.nn.Module, tuple]:
    """The encoder module and a key for its current patches and layer choice: what a
    cached function of the encoder's outputs must be keyed on."""
    return clip.cond_stage_model, (clip.patcher.patches_uuid, clip.layer_idx)


def encode(clip, text: str) -> torch.Tensor:
    """Conditioning context [1, tokens, dim] of one prompt, as a normal (non-inference) tensor."""
    return encode_pooled(clip, text)[0]


def encode_pooled(clip, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The context and the pooled text embedding [1, width] (SDXL's UNet takes it as its
    vector conditioning; None where the encoder has none)."""
    cond, pooled = clip.encode_from_tokens(checked_tokens(clip, text), return_pooled=True)
    return cond.detach().clone().float(), None if pooled is None else pooled.detach().clone().float()


def encode_many(clip, prompts: list[str]) -> torch.Tensor:
    """Contexts (N, 77, dim) of many one-chunk prompts in a single encoder pass.

    The host encodes a prompt's chunks as one batch and concatenates them, so joining the
    chunks of several prompts encodes them together, each exactly as it would be alone.
    """
    joined: dict[str, list] = {}
    for prompt in prompts:
        tokens = checked_tokens(clip, prompt)
        for key, chunks in tokens.items():
            if len(chunks) != 1:
                raise ValueError(f"encode_many takes one-chunk prompts; {prompt[:40]!r}... has {len(chunks)}")
            joined.setdefault(key, []).extend(chunks)
    cond = clip.encode_from_tokens(joined).detach().clone().float()
    return cond.reshape(len(prompts), -1, cond.shape[-1])


def _inner_encoders(clip) -> list[tuple[object, object]]:
    """(encoder, tokenizer) per text encoder, in the order the host concatenates their
    contexts: SD1 (clip_l), SD2 (clip_h), SDXL (clip_l, clip_g)."""
    outer, tokenizer = clip.cond_stage_model, clip.tokenizer
    if getattr(outer, "clip", "") in ("clip_l", "clip_h"):
        names = [outer.clip]
    elif hasattr(outer, "clip_l") and hasattr(outer, "clip_g"):  # SDXLClipModel
        names = ["clip_l", "clip_g"]
    else:
        raise ValueError(f"text encoder {type(outer).__name__} is not supported for inversion: use an SD1.x, SD2.x "
                         "or SDXL CLIP")
    pairs = [(getattr(outer, name, None), getattr(tokenizer, name, None)) for name in names]
    if any(inner is None or not hasattr(inner, "transformer") or tok is None for inner, tok in pairs):
        raise ValueError(f"text encoder {type(outer).__name__} does not hold the CLIP models {names}: "
                         "load the checkpoint's own CLIP")
    return pairs


def text_encoder_specs(clip) -> list:
    """The host's text encoders as `TextEncoderSpec`s: float32 copies of their (patched)
    weights, the output layer the CLIP's current clip-skip selects, their attention
    function, special tokens and pooled projection."""
    import comfy.ldm.modules.attention as attention

    from .text_encoder import TextEncoderSpec

    pairs = _inner_encoders(clip)
    for inner, _ in pairs:
        if inner.enable_attention_masks:
            raise ValueError(f"text encoder {type(inner).__name__} uses attention masks, which inversion does not support")
    clip.load_model()
    outer = clip.cond_stage_model
    outer.reset_clip_options()
    if clip.layer_idx is not None:
        outer.set_clip_options({"layer": clip.layer_idx})
    try:
        layers = [(inner.layer, inner.layer_idx, inner.layer_norm_hidden_state) for inner, _ in pairs]
    finally:
        outer.reset_clip_options()
    specs = []
    for (inner, tokenizer), (layer, layer_idx, norm_hidden) in zip(pairs, layers):
        if layer not in ("last", "hidden"):
            raise ValueError(f"text encoder output layer {layer!r} is not supported for inversion")
        model = inner.transformer
        with torch.inference_mode(False):
            weights = {f"text_model.{k}": v.detach().to(torch.float32).clone() for k, v in model.text_model.state_dict().items()}
            projection = model.text_projection.weight.detach().to(torch.float32).clone() if inner.return_projected_pooled else None
        first = model.text_model.encoder.layers[0]
        special = inner.special_tokens
        device = weights["text_model.embeddings.token_embedding.weight"].device
        specs.append(TextEncoderSpec(
            weights=weights, layers=len(model.text_model.encoder.layers), heads=first.self_attn.heads,
            activation=first.mlp.activation, output_layer=None if layer == "last" else layer_idx, norm_hidden=norm_hidden,
            attention=attention.optimized_attention_for_device(device, mask=True, small_input=True),
            start=special["start"], end=special["end"], pad=special["pad"], length=tokenizer.max_length,
            embedding_key=tokenizer.embedding_key, projection=projection,
        ))
    return specs


# --- the UNet ---------------------------------------------------------------------


AttnReplace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def existing_attn2_replace(patcher, block: tuple[str, int, int]) -> AttnReplace | None:
    """Another pack's attn2 replace for this block, if any (the host prefers the 3-key form)."""
    replaces = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replaces.get(block, replaces.get(block[:2]))


def register_attn2(patcher, layers: list[Attn2Layer], make: Callable[[Attn2Layer, AttnReplace | None], AttnReplace]) -> None:
    """Register one replace per layer on `patcher` (a clone), chained to any previous one."""
    for layer in layers:
        previous = existing_attn2_replace(patcher, layer.block)
        patcher.set_model_attn2_replace(make(layer, previous), *layer.block)


class _CopyWeight:
    """Identity weight/bias wrapper: its presence makes the host copy the tensor at cast time.

    Weights loaded under `torch.inference_mode()` are inference tensors, which autograd
    refuses to save for backward; the host's own trainer avoids that the same way.
    """

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def _needs_weight_copies(patcher) -> bool:
    return any(p.is_inference() for p in patcher.model.diffusion_model.parameters())


def unet_blocks(patcher) -> list[torch.nn.Module]:
    """The UNet's ResBlocks and transformer blocks: the units gradient checkpointing
    recomputes (between them sit only up/down-sampling convolutions)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    return [m for m in patcher.model.diffusion_model.modules() if isinstance(m, (ResBlock, SpatialTransformer))]


@contextlib.contextmanager
def trainable_unet(patcher, wrappers: dict[str, torch.nn.Module], to_device: torch.device | None = None) -> Iterator[Callable]:
    """Load a clone of `patcher` with differentiable weight wrappers and yield its forward.

    The forward is `fn(x_noisy, sigma, context) -> denoised`, run with the clone's
    transformer options (so attn2 replaces registered on the clone are active). On exit
    the clone is unloaded and every wrapper this function installed is removed from the
    shared modules, so nothing of the run remains on host objects.
    """
    import comfy.model_management as mm

    installed: list[torch.nn.Module | _CopyWeight] = list(wrappers.values())
    for key, wrapper in wrappers.items():
        patcher.add_weight_wrapper(key, wrapper)
    if _needs_weight_copies(patcher):
        for name, module in patcher.model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for attr in ("weight", "bias"):  # norms save both for backward
                key = f"{name}.{attr}"
                if getattr(module, attr, None) is not None and key not in wrappers:
                    copy = _CopyWeight()
                    patcher.add_weight_wrapper(key, copy)
                    installed.append(copy)
    flags = {p: p.requires_grad for p in patcher.model.parameters()}
    try:
        patcher.model.requires_grad_(False)
        mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
        yield unet_forward(patcher)
    finally:
        _unload(patcher, installed)
        _restore_requires_grad(flags)


def _restore_requires_grad(flags: dict[torch.nn.Parameter, bool]) -> None:
    for parameter, flag in flags.items():
        if parameter.requires_grad != flag:
            # inference tensors only accept the flag inside inference mode
            with torch.inference_mode(parameter.is_inference()):
                parameter.requires_grad_(flag)


def _unload(patcher, installed: list) -> None:
    import comfy.model_management as mm

    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            mm.current_loaded_models.pop(i)
            loaded.model_unload()
            break
    ours = {id(w) for w in installed}
    for module in patcher.model.modules():
        for attr in ("weight_function", "bias_function"):
            functions = getattr(module, attr, None)
            if functions:
                setattr(module, attr, [f for f in functions if id(f) not in ours])


def device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def model_sampling(patcher):
    return patcher.get_model_object("model_sampling")


def process_latent_in(patcher, latent: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the model's input space (the sampler does the same)."""
    return patcher.model.process_latent_in(latent)


def process_latent_out(patcher, latent: torch.Tensor) -> torch.Tensor:
    """The model's input space -> VAE latents."""
    return patcher.model.process_latent_out(latent)


def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents of `images`, as constants. Outside the host's inference mode (a script or
    library caller) the VAE's forward would otherwise hand training a graph that every step
    backs through again ("Trying to backward through the graph a second time")."""
    with torch.no_grad():
        return vae.encode(images[:, :, :, :3])


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> images (B, H, W, 3)."""
    return vae.decode(latents)


def conditioning(clip, text: str) -> list:
    """CONDITIONING of a prompt, as CLIPTextEncode builds it."""
    cond, pooled = clip.encode_from_tokens(checked_tokens(clip, text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample_latent(patcher, positive: list, negative: list, noise_seeds: list[int], latent: torch.Tensor,
                  steps: int = 20, cfg: float = 5.0, sampler_name: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """KSampler's sampling, one noise seed per batch row (one seed: KSampler's own batch noise)."""
    import comfy.sample

    if len(noise_seeds) == 1:
        noise = comfy.sample.prepare_noise(latent, noise_seeds[0])
    else:
        noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in noise_seeds])
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=noise_seeds[0])


def sample(patcher, positive: tuple[torch.Tensor, torch.Tensor | None], negative: tuple[torch.Tensor, torch.Tensor | None],
           seeds: list[int], shape: tuple[int, ...], steps: int = 20, cfg: float = 5.0) -> torch.Tensor:
    """VAE latents sampled as KSampler does (euler, normal), one per seed, from raw
    (context (1, T, D), pooled (1, W) or None) pairs instead of text: conditioning no
    prompt can spell. A positive of one row per seed, (N, T, D), samples N prompts in one call."""
    n = len(seeds)

    def cond(context: torch.Tensor, pooled: torch.Tensor | None) -> list:
        extra = {} if pooled is None else {"pooled_output": pooled.detach().expand(n, -1).cpu()}
        return [[context.detach().expand(n, -1, -1).cpu(), extra]]

    return sample_latent(patcher, cond(*positive), cond(*negative), seeds, torch.zeros((n, *shape)), steps, cfg)


def sampler_names() -> tuple[list[str], list[str]]:
    """The host's sampler and scheduler names (KSampler's combos)."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def preview_images(images: torch.Tensor, prefix: str) -> list[dict]:
    """Save images as the stock Preview Image node does (temp folder, PNG); the UI's file refs."""
    import nodes

    return nodes.PreviewImage().save_images(images, filename_prefix=prefix)["ui"]["images"]


def percent_to_sigma(patcher, percent: float) -> float:
    return float(model_sampling(patcher).percent_to_sigma(percent))


def vision_embeds(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP-vision image embeddings (B, D) of images (B, H, W, 3), as CLIPVisionEncode computes them."""
    return clip_vision.encode_image(images).image_embeds.float()


def checkpoint_state_dict(base_model, clip_state_dict: dict, vae_state_dict: dict) -> dict[str, torch.Tensor]:
    """A whole checkpoint's tensors, keyed as the host saves them (`model.diffusion_model.`,
    `cond_stage_model.`, `first_stage_model.` for SD1.x), from a host `BaseModel`.

    The call moved between the supported hosts: up to 0.3.x `BaseModel.state_dict_for_saving(
    clip, vae)` read its own UNet; later hosts take the UNet's state dict first
    (`state_dict_for_saving(unet, clip, vae)`), and the old call silently saves the CLIP
    weights in the UNet's place there. The signature says which one this host has.
    """
    import inspect

    saving = base_model.state_dict_for_saving
    if "unet_state_dict" in inspect.signature(saving).parameters:
        state = saving(base_model.diffusion_model.state_dict(), clip_state_dict=clip_state_dict,
                       vae_state_dict=vae_state_dict)
    else:
        state = saving(clip_state_dict=clip_state_dict, vae_state_dict=vae_state_dict)
    unet_keys = sum(k.startswith("model.diffusion_model.") for k in state)
    expected = len(base_model.diffusion_model.state_dict())
    if unet_keys != expected:
        raise RuntimeError(f"the host's state_dict_for_saving gave {unet_keys} UNet tensors, the model has {expected}: "
                           "its signature changed again; update fmn_core.host.checkpoint_state_dict")
    return state


# --- patches ----------------------------------------------------------------------


def lora_key_map(patcher) -> dict[str, str]:
    """The host's LoRA key conventions for this model (kohya, diffusers, generic)."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(patcher.model, {})


def clip_lora_shapes(clip) -> dict[str, tuple[int, ...]]:
    """LoRA module name -> weight shape for every text-encoder weight the host's CLIP key
    map reaches (its generic `text_encoders.` names included)."""
    import comfy.lora

    state = clip.cond_stage_model.state_dict()
    return {module: tuple(state[key].shape) for module, key in comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}).items()}


def apply_lora(patcher, lora: dict[str, torch.Tensor], strength: float, clip=None):
    """Clone and patch exactly as the stock LoraLoaderModelOnly does; with `clip`, as the
    stock LoraLoader does, and return (model, clip)."""
    import comfy.sd

    patched, patched_clip = comfy.sd.load_lora_for_models(patcher, clip, lora, strength, strength)
    return patched if clip is None else (patched, patched_clip)


# --- progress ---------------------------------------------------------------------


class Progress:
    """The host's progress bar plus its interrupt check, one call per step."""

    def __init__(self, total: int):
        import comfy.utils

        self._bar = comfy.utils.ProgressBar(total)

    def step(self) -> None:
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        self._bar.update(1)

    def start_at(self, done: int) -> None:
        """A resumed run: the bar starts at the steps already done."""
        self._bar.update_absolute(done)


def loaded_forward(patcher) -> Callable:
    """Load `patcher` (merging its weight patches) and return its UNet forward, for
    measurements under no_grad: `fn(x_noisy, sigma, context) -> denoised`."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    return unet_forward(patcher)


def unet_forward(patcher) -> Callable:
    """`fn(x_noisy, sigma, context, pooled=None) -> denoised` through the host's
    apply_model with the patcher's transformer options (so its attn2 replaces run).

    Models with a vector conditioning (SDXL: the pooled text embedding and the image size)
    get it from `pooled` and the latent's size, as the host's sampler builds it."""
    model = patcher.model
    options = patcher.model_options["transformer_options"]

    def forward(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"y": _vector_conditioning(model, x, pooled)} if model.adm_channels else {}
        return model.apply_model(x, sigma, c_crossattn=context, transformer_options=options, **extra)

    return forward


def _vector_conditioning(model, x: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    if pooled is None:
        raise ValueError(f"model type {type(model.model_config).__name__} needs the prompt's pooled text embedding "
                         "(host.encode_pooled) beside its context")
    y = model.encode_adm(pooled_output=pooled.to(x.device), width=x.shape[-1] * VAE_FACTOR,
                         height=x.shape[-2] * VAE_FACTOR, device=x.device)
    return y.to(x.device).expand(x.shape[0], -1) if y.shape[0] == 1 else y.to(x.device)
