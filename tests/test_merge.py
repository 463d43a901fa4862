"""Merge Forget Patches: least-squares fusion on a small SD1-layout model and CLIP built
from the host's classes (the Forget Train tests' budget), compared with adding the patches."""
from dataclasses import replace

import pytest
import torch

import host_models as hm
from attention_checks import RESOLUTION, concept_share_ratio
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.merge import _delta, concepts_of, merge_patches
from fmn_pack.fmn_core.patch import ForgetPatch, apply_patch, kohya_named, load_patch, save_patch
from fmn_pack.fmn_core.train import ForgetConfig, build_examples, forget

BUDGET = {"steps": 35, "learning_rate": 1e-2, "rank": 2, "output_weight": 0.0, "resolution": RESOLUTION}
CONCEPTS = ("van gogh | style", "claude monet | style")


@pytest.fixture(scope="module")
def sd1():
    return hm.sd15_model(), hm.sd1_clip()


@pytest.fixture(scope="module")
def singles(sd1):
    with torch.inference_mode():
        return [ForgetPatch(*_trained(sd1, line)) for line in CONCEPTS]


def _trained(sd1, line):
    result = forget(*sd1, parse_concepts(line), ForgetConfig(**BUDGET))
    return result.lora, result.metadata


def concept_rows(clip, patch: ForgetPatch) -> torch.Tensor:
    """The context rows the patch was aimed at: its concept's tokens in the templates."""
    return torch.cat([e.context[0][e.mask > 0] for e in build_examples(clip, concepts_of(patch), False)]).double()


def own_effect_error(fused: ForgetPatch, patches: list[ForgetPatch], clip, sum_instead: bool = False) -> float:
    """Relative error, over every to_k/to_v layer and patch, of the fused update on each
    patch's own concept rows against that patch alone: |(dW - dW_i) C_i^T| / |dW_i C_i^T|.
    Layers are matched in the fused patch's naming (kohya's)."""
    patches = [kohya_named(p) for p in patches]
    errors = []
    rows = [concept_rows(clip, p) for p in patches]
    for module in patches[0].modules():
        if not module.endswith(("to_k", "to_v")):
            continue
        mine = [_delta(p, module) for p in patches]
        merged = sum(mine) if sum_instead else _delta(fused, module)
        for delta, c in zip(mine, rows):
            errors.append(float((merged - delta).mm(c.T).norm() / delta.mm(c.T).norm()))
    return max(errors)


def test_the_fused_patch_keeps_each_patchs_effect_on_its_own_concept_better_than_the_sum(sd1, singles):
    model, clip = sd1
    with torch.inference_mode():
        fused = merge_patches(clip, singles)
        fused_error, sum_error = own_effect_error(fused, singles, clip), own_effect_error(fused, singles, clip, True)
        ratios = [concept_share_ratio(model, apply_patch(model, fused, 1.0), clip, line.split("|")[0].strip())
                  for line in CONCEPTS]
    assert fused_error < 0.5 * sum_error, (fused_error, sum_error)
    assert max(ratios) <= 0.5, f"the fused patch kept {ratios} of the concepts' attention"
    assert fused.concepts == ["van gogh", "claude monet"] and fused.metadata["fmn.mode"] == "merged"


def test_a_patch_merged_with_itself_needs_no_more_rank(sd1, singles):
    _, clip = sd1
    one = singles[0]
    with torch.inference_mode():
        doubled = merge_patches(clip, [one, one])
    assert int(doubled.metadata["fmn.rank"]) <= one.lora[f"{one.modules()[0]}.lora_up.weight"].shape[1]
    assert own_effect_error(doubled, [one], clip) < 0.15


def test_the_merge_node_output_saves_loads_and_applies(sd1, singles, tmp_path):
    from fmn_pack.nodes import NODE_CLASS_MAPPINGS as NODES
    model, clip = sd1
    with torch.inference_mode():
        (fused,) = NODES["FMN_MergeForgetPatches"]().merge(clip, singles[0], singles[1], 1.0)
        loaded = load_patch(save_patch(fused, tmp_path / "fused.safetensors"))
        patched = apply_patch(model, loaded, 1.0)
    assert loaded.concepts == ["van gogh", "claude monet"] and patched is not model
    assert sorted(loaded.modules()) == sorted(kohya_named(singles[0]).modules())


def test_patches_for_different_models_or_too_few_are_refused_before_any_work(sd1, singles):
    _, clip = sd1
    other = replace(singles[1], metadata={**singles[1].metadata, "fmn.base_arch": "SDXL", "fmn.context_dim": "2048"})
    with pytest.raises(ValueError, match=r"different base models \(model family: patch 1: SD15, patch 2: SDXL\)"):
        merge_patches(clip, [singles[0], other])
    with pytest.raises(ValueError, match="at least two"):
        merge_patches(clip, [singles[0]])
    with pytest.raises(ValueError, match="preserve_weight"):
        merge_patches(clip, singles, preserve_weight=-1.0)


def test_a_layer_smaller_than_the_merged_rank_carries_its_own_full_rank():
    """Ten merged ToyBench patches declared rank 58 while a 32-wide to_k holds at most 32:
    such a layer fits; any other shortfall or excess is still a damaged file."""
    from fmn_pack.fmn_core.patch import rank_fits
    assert rank_fits(58, 58, (32, 64)) and rank_fits(32, 58, (32, 64)) and rank_fits(4, 4, (320, 768))
    assert not rank_fits(31, 58, (32, 64)) and not rank_fits(3, 4, (320, 768)) and not rank_fits(5, 4, (320, 768))
