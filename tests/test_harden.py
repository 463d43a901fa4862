"""Harden Forget Patch on the shipped ToyBench model (real host classes): a fresh attack
fits worse through the hardened model, the inputs stay as they were, and bad input is
refused before any training."""
import pytest
import torch

from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.harden import HardenConfig, check_hardenable, harden, patch_digest
from fmn_pack.fmn_core.inversion import invert
from fmn_pack.fmn_core.merge import merge_patches
from fmn_pack.fmn_core.patch import HARDEN_MODE, ForgetPatch, apply_patch
from fmn_pack.fmn_core.train import ForgetConfig, forget
from fmn_pack.nodes import NODE_CLASS_MAPPINGS
from fmn_pack.toybench import loader, probes, world

CONCEPT = "zebra"
# A short run: one attack round, a fraction of the node's steps (the full figures are in
# bench/retrain_floor.json, 'pack defaults + hardened').
SMALL = {"rounds": 1, "steps": 60, "inversion_steps": 40, "samples_per_prompt": 1, "random_rows": 4}


@pytest.fixture(scope="module")
def toy():
    return loader.load()


@pytest.fixture(scope="module")
def forgotten(toy):
    mp, clip, _ = toy
    config = ForgetConfig(resolution=32, seed=0)
    with torch.inference_mode():
        result = forget(mp, clip, parse_concepts(f"{CONCEPT} | style"), config, None)
    return ForgetPatch(result.lora, result.metadata)


def _state(mp) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mp.model.diffusion_model.state_dict().items()}


@pytest.fixture(scope="module")
def hardened(toy, forgotten):
    mp, clip, vae = toy
    before, patch_before = _state(mp), {k: v.clone() for k, v in forgotten.lora.items()}
    with torch.inference_mode():
        images = probes.concept_latents(mp, vae, CONCEPT, count=16, seed=500)
    config = HardenConfig(**SMALL, templates=(probes.TEMPLATES["style"],),
                          keep=tuple(s.prompt for s in world.all_scenes() if CONCEPT not in s.concepts))
    result = harden(mp, clip, forgotten, images, config)
    after = _state(mp)
    assert all(torch.equal(before[k], after[k]) for k in before), "hardening changed the input model's weights"
    assert all(torch.equal(patch_before[k], forgotten.lora[k]) for k in patch_before), "it changed the forget patch"
    return result


def _attack(mp, clip, vae, oracle_net) -> tuple[float, float]:
    """A fresh attack (other pictures and seed than hardening used): its final fit, and the
    oracle's detection of the concept in samples of its recovered tokens."""
    with torch.inference_mode():
        images = probes.concept_latents(mp, vae, CONCEPT, count=8, seed=100)
    config = probes.config_for(CONCEPT, num_tokens=4, steps=60, learning_rate=1e-2, seed=3)
    found = invert(mp, clip, images, probes.GENERIC_INIT["style"], config)
    with torch.inference_mode():
        rate = probes.sample_rate(mp, clip, vae, oracle_net, CONCEPT, found.vectors, list(range(9000, 9016)))
    return sum(found.losses[-15:]) / 15, rate


def test_a_fresh_attack_fits_worse_and_recovers_less_through_the_hardened_model(toy, forgotten, hardened):
    mp, clip, vae = toy
    oracle_net = loader.load_oracle()
    patched = apply_patch(mp, forgotten, 1.0)
    both = apply_patch(patched, hardened.patch, 1.0)
    (loss_patch, rate_patch), (loss_both, rate_both) = (_attack(m, clip, vae, oracle_net) for m in (patched, both))
    assert loss_both > 1.3 * loss_patch, (loss_patch, loss_both)
    assert rate_both < rate_patch - 0.25, (rate_patch, rate_both)
    assert hardened.losses[-1] < 0.5 * hardened.losses[0], hardened.losses[::10]


def test_the_hardening_patch_is_a_lora_of_the_transformer_blocks_that_names_its_forget_patch(toy, forgotten, hardened):
    patch = hardened.patch
    assert patch.metadata["fmn.mode"] == HARDEN_MODE and patch.concepts == [CONCEPT]
    assert patch.metadata["fmn.hardens"] == patch_digest(forgotten)
    modules = patch.unet_modules()
    assert modules and all("_transformer_blocks_" in m for m in modules)
    assert any(m.endswith("attn1_to_q") for m in modules) and any(m.endswith("ff_net_2") for m in modules)
    with pytest.raises(ValueError, match="already a hardening patch"):
        check_hardenable(patch)
    with pytest.raises(ValueError, match="hardening patch .* merge the forget patches, then harden"):
        merge_patches(toy[1], [forgotten, patch])


def test_bad_input_is_refused_before_any_training(toy, forgotten):
    mp, clip, vae = toy
    with torch.inference_mode():
        rows = forget(mp, clip, parse_concepts(f"{CONCEPT} | style"), ForgetConfig(mode="token rows", steps=2,
                                                                                       resolution=32), None)
        two = forget(mp, clip, parse_concepts("zebra | style\nneon | style"), ForgetConfig(steps=2, resolution=32), None)
    with pytest.raises(ValueError, match="'token rows' patch .* nothing in the UNet to harden"):
        harden(mp, clip, ForgetPatch(rows.lora, rows.metadata), None, HardenConfig())
    images = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match="forgets 2 concepts and images can show only one"):
        harden(mp, clip, ForgetPatch(two.lora, two.metadata), images, HardenConfig())
    for bad, message in (({"steps": 2, "rounds": 3}, "must be at least rounds"),
                         ({"templates": ("a photo of",)}, "exactly one {}")):
        with pytest.raises(ValueError, match=message):
            harden(mp, clip, forgotten, images, HardenConfig(**bad))
    node = NODE_CLASS_MAPPINGS["FMN_HardenForgetPatch"]()
    with pytest.raises(ValueError, match="in both the forget and the keep list"):
        node.harden(mp, clip, forgotten, 1, 1, 1e-3, 1, 0, keep="zebra")
