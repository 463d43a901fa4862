"""Mode 'token rows': the concept's words' rows of the text encoder, on the host's own
SD1 classes (random weights), applied through the host's LoRA loader."""
import pytest
import torch

import folder_paths
import host_models as hm
import nodes as host_nodes
from attention_checks import PROMPTS_WITHOUT_CONCEPT, RESOLUTION, concept_share_ratio, worst_word_change
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.merge import merge_patches
from fmn_pack.fmn_core.patch import ForgetPatch, apply_patch, apply_patch_with_clip, load_patch, save_patch
from fmn_pack.fmn_core.train import ForgetConfig, forget

CONCEPT = "van gogh"


def token_patch(model, clip, concepts=f"{CONCEPT} | style", **overrides) -> ForgetPatch:
    config = ForgetConfig(resolution=RESOLUTION, mode="token rows", **{"steps": 60, **overrides})
    result = forget(model, clip, parse_concepts(concepts), config)
    return ForgetPatch(result.lora, result.metadata)


@pytest.fixture(scope="module")
def sd1():
    return hm.sd15_model(), hm.sd1_clip()


@pytest.fixture(scope="module")
def patch(sd1):
    return token_patch(*sd1)


def test_prompts_without_the_words_stay_exactly_as_they_were(sd1, patch):
    model, clip = sd1
    patched_model, patched_clip = apply_patch_with_clip(model, clip, patch, 1.0)
    assert patch.unet_modules() == [] and patch.text_modules() == ["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding"]
    assert patch.metadata["fmn.mode"] == "token rows" and "CLIP" in patch.metadata["modelspec.usage_hint"]
    for prompt in PROMPTS_WITHOUT_CONCEPT:
        assert torch.equal(host.encode(patched_clip, prompt), host.encode(clip, prompt))
    assert worst_word_change(model, patched_model, clip, patched_clip) == 0.0
    assert not torch.equal(host.encode(patched_clip, f"a painting by {CONCEPT}"), host.encode(clip, f"a painting by {CONCEPT}"))
    # Held-out templates: the share falls (to 0.55 of its value here; docs/method.md), the inputs stay as they were.
    assert concept_share_ratio(model, patched_model, clip, CONCEPT, patched_clip) < 0.75
    assert model.patches == {} and clip.patcher.patches == {}


def test_the_edit_touches_only_the_concepts_rows(sd1, patch):
    _, clip = sd1
    module = patch.text_modules()[0]
    up, down = patch.lora[f"{module}.lora_up.weight"], patch.lora[f"{module}.lora_down.weight"]
    ids = sorted(int(t) for t in host.tokenize(clip, CONCEPT)[0][1:3])
    assert up.shape == (49408, 2) and down.shape == (2, 768) and float(patch.lora[f"{module}.alpha"]) == 2.0
    assert torch.nonzero(up.float().abs().sum(1)).flatten().tolist() == ids
    assert float(down.float().norm()) > 0


def test_the_stock_lora_loader_applies_the_same_edit(sd1, patch, tmp_path):
    model, clip = sd1
    save_patch(patch, tmp_path / "rows.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    _, stock_clip = host_nodes.LoraLoader().load_lora(model, clip, "rows.safetensors", 0.7, 0.7)
    _, our_clip = apply_patch_with_clip(model, clip, load_patch(tmp_path / "rows.safetensors"), 0.7)
    prompt = f"a quiet village painted by {CONCEPT}"
    assert torch.equal(host.encode(stock_clip, prompt), host.encode(our_clip, prompt))
    assert not torch.equal(host.encode(our_clip, prompt), host.encode(clip, prompt))


def test_applying_it_without_the_clip_says_to_connect_it(sd1, patch):
    model, clip = sd1
    with pytest.raises(ValueError, match="edits the text encoder .*connect the CLIP to Apply Forget Patch"):
        apply_patch(model, patch, 1.0)
    with pytest.raises(ValueError, match="the CLIP has no weight text_encoders.clip_l"):
        apply_patch_with_clip(hm.sd2_model(), hm.sd2_clip(), ForgetPatch(patch.lora, {}), 1.0)


def test_merging_stacks_the_text_sides_exactly(sd1, patch):
    model, clip = sd1
    other = token_patch(model, clip, "red fox | object", steps=10)
    merged = merge_patches(clip, [patch, other])
    _, stacked = apply_patch_with_clip(model, clip, other, 1.0)
    _, stacked = apply_patch_with_clip(model, stacked, patch, 1.0)
    _, fused = apply_patch_with_clip(model, clip, merged, 1.0)
    for prompt in (f"a painting by {CONCEPT}", "a photo of a red fox", PROMPTS_WITHOUT_CONCEPT[0]):
        assert torch.allclose(host.encode(fused, prompt), host.encode(stacked, prompt), atol=1e-3)
    assert merged.text_modules() == patch.text_modules() and merged.unet_modules() == []


def test_bad_inputs_are_refused_before_training(sd1, tmp_path):
    model, clip = sd1
    with pytest.raises(ValueError, match="'a van' \\(keep\\) shares a word with 'van gogh'"):
        forget(model, clip, parse_concepts(f"{CONCEPT} | style"),
               ForgetConfig(mode="token rows", steps=1, resolution=RESOLUTION, keep=("a van",)))
    with pytest.raises(ValueError, match="writes no checkpoints"):
        forget(model, clip, parse_concepts(f"{CONCEPT} | style"), ForgetConfig(mode="token rows", steps=1),
               resume=tmp_path / "state.fmn-state")


def test_sdxl_gets_one_edit_per_text_encoder():
    """SDXL's CLIP-L and CLIP-G each look the words up in their own table: one LoRA each,
    both applied by the host, ordinary prompts still exactly as they were."""
    model, clip = hm.sdxl_model(), hm.sdxl_clip()
    patch = token_patch(model, clip, steps=3)
    assert [m.split(".")[1] for m in patch.text_modules()] == ["clip_g", "clip_l"]
    _, patched_clip = apply_patch_with_clip(model, clip, patch, 1.0)
    for prompt, same in ((PROMPTS_WITHOUT_CONCEPT[1], True), (f"a painting by {CONCEPT}", False)):
        (context, pooled), (edited, edited_pooled) = host.encode_pooled(clip, prompt), host.encode_pooled(patched_clip, prompt)
        assert torch.equal(context, edited) is same and torch.equal(pooled, edited_pooled) is same


def test_the_warm_start_makes_the_words_read_as_the_anchor(sd1):
    """With `warm_start` the rows start as the anchor's words ("red fox" as "an object"),
    so before any real step the concept's prompt already encodes as the anchor's."""
    model, clip = sd1
    prompt, anchor = "a photo of red fox", host.encode(clip, "a photo of an object")
    gaps = {}
    for warm in (True, False):
        patch = token_patch(model, clip, "red fox | object", steps=1, learning_rate=1e-6, warm_start=warm)
        _, patched_clip = apply_patch_with_clip(model, clip, patch, 1.0)
        gaps[warm] = float((host.encode(patched_clip, prompt) - anchor).abs().max())
    assert gaps[True] < 0.01 < gaps[False], gaps
