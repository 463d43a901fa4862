"""The host's text side: tokens as the UNet context sees them, embeddings checked before the
host reads them, prompt encodings, and float32 copies of the text encoders for inversion."""
from __future__ import annotations

import os
import re

import torch

from ..safetensors_check import load_checked


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

    from ..text_encoder import TextEncoderSpec

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
