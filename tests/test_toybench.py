"""ToyBench: the world's oracle, the shipped model on the real host classes, the loader's checks."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from fmn_pack.nodes import NODE_CLASS_MAPPINGS
from fmn_pack.toybench import loader, oracle, train, world

MIN_ORACLE_ACCURACY = 0.95
MIN_DETECTION = 0.80


@pytest.fixture(scope="module")
def oracle_net():
    return loader.load_oracle()


@pytest.fixture(scope="module")
def toy():
    return loader.load()


def test_world_prompts_and_labels():
    scenes = world.all_scenes()
    assert len(world.CONCEPTS) == 12 and len({s.prompt for s in scenes}) == len(scenes) == 35
    assert "a star in the style of neon" in {s.prompt for s in scenes}
    bare = {s.prompt: world.labels(s) for s in scenes if s.bare_style}
    assert bare == {"a ring in the style of": (0, 1, 0), "a cross in the style of": (0, 2, 0), "a star in the style of": (0, 3, 0),
                    "a moon in the style of": (0, 4, 0), "an object in the style of": (0, 0, 0)}
    for concept in world.CONCEPTS:
        assert all(concept in s.prompt for s in world.scenes_for(concept))
    generic = world.generic_scenes()
    assert {s.prompt for s in generic} >= {"a portrait of a person", "an object", "an object in the style of zebra"}
    assert all(not any(c in s.prompt for c in world.IDENTITIES + world.OBJECTS) for s in generic)
    assert [world.labels(s) for s in generic[:2]] == [(0, 0, 0), (0, 0, 0)]
    images, labels, _ = world.dataset(8, seed=5)
    assert images.shape == (8, 32, 32, 3) and 0 <= images.min() and images.max() <= 1 and labels.shape == (8, 3)


def test_oracle_accuracy_on_fresh_images(oracle_net):
    acc = oracle.accuracy(oracle_net, n_images=1200, seed=777)  # seeds unused by training
    low = {c: a for c, a in acc.items() if a < MIN_ORACLE_ACCURACY}
    assert not low, f"oracle below {MIN_ORACLE_ACCURACY:.0%}: {low}"


def test_oracle_sees_no_concept_in_generic_scenes(oracle_net):
    """A plain face or an empty frame must not count as a forgotten concept coming back."""
    import numpy as np
    rng = np.random.default_rng(4242)
    scenes = [s for s in world.generic_scenes() if not s.style]
    images = torch.from_numpy(np.stack([world.render(scenes[i % len(scenes)], rng) for i in range(40)]))
    seen = [c for c in oracle_net.concepts(images) if c]
    assert len(seen) <= 1, f"concepts seen in generic images: {seen}"


def test_loader_builds_host_objects(toy):
    import comfy.model_patcher
    import comfy.sd
    mp, clip, vae = toy
    assert isinstance(mp, comfy.model_patcher.ModelPatcher) and isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    keys = mp.model.diffusion_model.state_dict().keys()
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "middle_block.1.transformer_blocks.0.attn2.to_v.weight" in keys
    cond = clip.encode_from_tokens(clip.tokenize("a portrait of Captain Zorb"))
    assert cond.shape == (1, 77, 768)
    image = vae.decode(torch.zeros(1, 4, 4, 4))
    assert image.shape[-3:] == (32, 32, 3)
    assert vae.encode(image).shape == (1, 4, 4, 4)


def test_node_returns_model_clip_vae():
    node = NODE_CLASS_MAPPINGS["FMN_LoadToyBench"]
    assert node.CATEGORY == "Forget-Me-Not" and node.RETURN_TYPES == ("MODEL", "CLIP", "VAE")
    assert node.INPUT_TYPES() == {"required": {}} and len(node.OUTPUT_TOOLTIPS) == 3
    mp, clip, vae = getattr(node(), node.FUNCTION)()
    assert mp.model.diffusion_model is not None and clip is not None and vae is not None


def test_shipped_model_generates_each_concept(toy, oracle_net):
    """Host sampler (euler, 20 steps, CFG 5) on seeds the training never used: 16 per portrait,
    6 per object prompt, so 30 samples per object and 24 per style."""
    mp, clip, vae = toy
    with torch.inference_mode():
        rates = train.detection_rates(mp, clip, vae, oracle_net, list(range(5000, 5016)), list(range(5000, 5006)))
    low = {c: round(r, 3) for c, r in rates.items() if r < MIN_DETECTION}
    assert not low, f"detection below {MIN_DETECTION:.0%}: {low} (all: {rates})"


def test_forget_train_defaults_erase_a_portrait_and_keep_the_others(toy, oracle_net):
    """Forget Train with the pack's defaults and eight rendered images of Captain Zorb, on
    the shipped model; the world's own prompts on held-out seeds: his portrait loses him,
    the other three portraits keep theirs."""
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget
    mp, clip, vae = toy
    portraits = [s for s in world.all_scenes() if s.identity]
    seeds = list(range(6000, 6016))
    with torch.inference_mode():
        images = torch.from_numpy(world.images_of("Captain Zorb", 8, seed=100))
        latents = {0: host.process_latent_in(mp, host.vae_encode(vae, images).float())}
        result = forget(mp, clip, parse_concepts("Captain Zorb | identity"), ForgetConfig(resolution=32), latents)
        patched = host.apply_lora(mp, result.lora, 1.0)
        before = train.detection_rates(mp, clip, vae, oracle_net, seeds, seeds, scenes=portraits)
        after = train.detection_rates(patched, clip, vae, oracle_net, seeds, seeds, scenes=portraits)
    assert before["Captain Zorb"] >= MIN_DETECTION and after["Captain Zorb"] <= 0.2, (before, after)
    for other in ("Madame Plink", "Doctor Vex", "Baron Quog"):
        assert after[other] >= before[other] - 0.15, (other, before, after)


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_loader_refuses_missing_or_altered_weights(tmp_path, damage):
    folder = tmp_path / "weights"
    shutil.copytree(loader.WEIGHTS, folder)
    target = folder / "vae.safetensors"
    if damage == "missing":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    with pytest.raises(loader.ToyBenchWeightsError) as err:
        loader.load(folder)
    message = str(err.value)
    assert str(target) in message and damage in message and "python -m toybench.train" in message


def test_manifest_records_every_file():
    manifest = json.loads((loader.WEIGHTS / "manifest.json").read_text())
    assert set(manifest["files"]) == {"unet.safetensors", "clip.safetensors", "vae.safetensors", "oracle.safetensors"}
    assert sum((loader.WEIGHTS / f).stat().st_size for f in manifest["files"]) <= 30 * 1024 * 1024


def test_step_bounded_training_is_deterministic(toy):
    """bench_retrain_floor.py compares two UNets trained for the same number of steps: with
    time to spare, the learning-rate schedule must follow the steps, not the clock."""
    from fmn_pack.toybench import model as M
    assert train.progress(seconds=5, minutes=1e6, step=250, max_steps=1000) == 0.25
    assert train.progress(seconds=30, minutes=1, step=3, max_steps=100000) == 0.5
    mp, clip, vae = toy
    scenes = world.all_scenes()[:2]
    images, scene_idx = train.render_scenes(scenes, 4, seed=3)
    assert images.shape == (8, 32, 32, 3) and scene_idx.tolist() == [0] * 4 + [1] * 4
    latents = mp.model.latent_format.process_in(train.encode_images(vae, images))
    contexts, empty = train.scene_contexts(clip, scenes)

    def trained():
        patcher = M.unet()
        train.train_unet(patcher, latents, scene_idx, contexts, empty, minutes=1e6, max_steps=3, seed=0,
                         log=lambda _: None, batch=4)
        return patcher.model.diffusion_model.state_dict()

    first, second, init = trained(), trained(), M.unet().model.diffusion_model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], init[k]) for k in first)


# --- Concept Inversion and M-Score on the shipped model -----------------------------------

def test_inversion_recovers_a_concept_from_a_generic_word(toy, oracle_net):
    """Captain Zorb's images inverted from the word 'person': the learned tokens draw him."""
    from fmn_pack.toybench import probes
    mp, clip, vae = toy
    with torch.inference_mode():
        rate, result = probes.recovery_rate(mp, clip, vae, oracle_net, "Captain Zorb", list(range(6000, 6016)),
                                            **probes.RECOVERY)
        start = probes.sample_rate(mp, clip, vae, oracle_net, "Captain Zorb", result.initial, list(range(6000, 6016)))
    assert start <= 0.2 and rate >= 0.7, f"detection from the initial tokens {start:.2f}, from the learned ones {rate:.2f}"


def test_m_score_drops_for_the_forgotten_concept_and_not_for_the_kept(toy):
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.mscore import m_scores
    from fmn_pack.fmn_core.train import ForgetConfig, forget
    from fmn_pack.toybench import probes
    mp, clip, vae = toy
    drops = {}
    with torch.inference_mode():
        latents = {0: probes.concept_latents(mp, vae, "Captain Zorb")}
        result = forget(mp, clip, parse_concepts("Captain Zorb | identity"), ForgetConfig(resolution=32), latents)
        patched = host.apply_lora(mp, result.lora, 1.0)
        for concept in ("Captain Zorb", "Madame Plink", "star"):
            rows = m_scores([("original", mp), ("patched", patched)], clip, probes.concept_latents(mp, vae, concept),
                            concept, probes.config_for(concept, **probes.M_SCORE), probes.M_SCORE_INIT)
            drops[concept] = rows[1].drop
    kept = max(drops["Madame Plink"], drops["star"])
    assert drops["Captain Zorb"] > 0 and drops["Captain Zorb"] > kept, drops


def test_m_score_image_space_score_through_a_host_clip_vision_model(toy, tmp_path):
    """The optional CLIP_VISION input: a small vision tower of the host's own class (random
    weights, seeded) scores images sampled from each recovered embedding against the anchors."""
    import comfy.clip_vision
    from fmn_pack.fmn_core.mscore import m_scores, table
    from fmn_pack.toybench import model as toy_model, probes
    config = {"hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 32, "intermediate_size": 128,
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 32}  # the host reads layer -2
    (tmp_path / "vision.json").write_text(json.dumps(config))
    vision = comfy.clip_vision.ClipVisionModel(str(tmp_path / "vision.json"))
    toy_model.init_module(vision.model, seed=3)
    mp, clip, vae = toy
    settings = probes.config_for("Captain Zorb", num_tokens=2, steps=3, learning_rate=1e-2)
    with torch.inference_mode():
        latents = probes.concept_latents(mp, vae, "Captain Zorb", count=4)
        rows = m_scores([("original", mp)], clip, latents, "Captain Zorb", settings, "person", vision=vision, vae=vae)
        again = m_scores([("original", mp)], clip, latents, "Captain Zorb", settings, "person", vision=vision, vae=vae)
    similarity = rows[0].image_similarity
    assert similarity is not None and -1.0 <= similarity <= 1.0 and rows == again
    assert "image sim" in table(rows, "Captain Zorb", settings, "person")


def output_drift(original, patched, clip, prompts: list[str], seed: int = 4) -> float:
    """Mean squared difference of the two models' denoised outputs on the prompts, each at
    the same fixed noisy latents and three noise levels."""
    from fmn_pack.fmn_core import host
    x = torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(seed))
    sigmas = (1.0, 3.0, 8.0)
    outputs = []
    for model in (original, patched):
        forward = host.loaded_forward(model)
        contexts = [host.encode(clip, p) for p in prompts]
        outputs.append(torch.stack([forward(x[i:i + 1] * s, torch.tensor([s]), c) for c in contexts for i, s in enumerate(sigmas)]))
    return float((outputs[0] - outputs[1]).pow(2).mean())


def test_a_keep_list_holds_the_original_output_on_kept_prompts(toy):
    """Forget Train's preservation term: forgetting star with neon and zebra kept moves the
    model's output on prompts of those styles (without star, which must change) less than
    forgetting it alone. Measured: 0.0068 against 0.0129."""
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget
    from fmn_pack.toybench import probes
    mp, clip, vae = toy
    kept_prompts = ["an object in the style of neon", "a moon in the style of zebra", "a ring in the style of neon",
                    "a cross in the style of zebra", "a portrait of Captain Zorb in the style of neon"]
    drift = {}
    with torch.inference_mode():
        latents = {0: probes.concept_latents(mp, vae, "star")}
        for keep in ((), ("neon", "zebra")):
            config = ForgetConfig(resolution=32, steps=40, keep=keep)
            patched = host.apply_lora(mp, forget(mp, clip, parse_concepts("star | object"), config, latents).lora, 1.0)
            drift[keep] = output_drift(mp, patched, clip, kept_prompts)
    assert drift[("neon", "zebra")] < 0.7 * drift[()], drift


def star_left(toy, oracle_net, configs: dict[str, object]) -> dict[str, float]:
    """Per ForgetConfig: the share of star's prompts' samples (the report's 48 seeds per
    prompt) that still show a star through the patched model and CLIP."""
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import forget
    from fmn_pack.toybench import probes
    mp, clip, vae = toy
    scenes = [s for s in world.all_scenes() if "star" in s.concepts]
    seeds = list(range(9100, 9148))
    left = {}
    with torch.inference_mode():
        latents = {0: probes.concept_latents(mp, vae, "star")}
        for name, config in configs.items():
            result = forget(mp, clip, parse_concepts("star | object"), config, latents)
            patched, patched_clip = host.apply_lora(mp, result.lora, 1.0, clip)
            left[name] = train.detection_rates(patched, patched_clip, vae, oracle_net, seeds, seeds, scenes=scenes)["star"]
    return left


def test_negative_guidance_erases_the_residual_the_anchor_target_leaves(toy, oracle_net):
    """star, the concept the anchor target alone leaves most of (0.118 of its prompts'
    samples on 48 held-out seeds each in bench/quality.json, 0.021 with the default negative
    guidance): where a noisy latent already shows a star, the anchor prompt's prediction
    keeps it, and only a target pushed past the anchor takes it out. Read on the report's
    48 seeds per prompt: on 16 (6000-6015, 96 samples) the two read 0.042 and 0.021, too
    few samples to tell them apart."""
    from fmn_pack.fmn_core.train import ForgetConfig
    guided = ForgetConfig().negative_guidance
    left = star_left(toy, oracle_net, {"anchor": ForgetConfig(resolution=32, negative_guidance=0.0),
                                       "guided": ForgetConfig(resolution=32, negative_guidance=guided)})
    assert guided > 0 and left["guided"] <= 0.05 and left["anchor"] >= left["guided"] + 0.05, left


def test_token_rows_erase_star_with_the_output_term_leading(toy, oracle_net):
    """Mode 'token rows' weighs the output term OUTPUT_SCALE times (token_rows.py): at the
    UNet modes' balance of the two terms the attention term moves the row to places the
    UNet still reads as a star (0.28 of its prompts' samples on bench/quality.json's 36,
    against 0.03 with the output term leading). Read on the report's 48 seeds per prompt,
    where the two read 0.36 and 0.02."""
    from fmn_pack.fmn_core.token_rows import OUTPUT_SCALE
    from fmn_pack.fmn_core.train import ForgetConfig
    weight = ForgetConfig().output_weight
    left = star_left(toy, oracle_net, {
        balance: ForgetConfig(resolution=32, mode="token rows", output_weight=output_weight)
        for balance, output_weight in (("rows", weight), ("unet modes", weight / OUTPUT_SCALE))})
    assert OUTPUT_SCALE > 1 and left["rows"] <= 0.05 and left["unet modes"] >= left["rows"] + 0.1, left


def test_the_recovery_judge_agrees_with_the_oracle(toy, oracle_net):
    """The Recovery Attack's judge (the original model as a diffusion classifier, the
    concept's prompt against the anchor's) on the toy's own samples of each prompt: it must
    call them as the oracle does."""
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.recovery import shows_concept
    mp, clip, vae = toy
    seeds = list(range(7000, 7008))
    agree, total = 0, 0
    with torch.inference_mode():
        for concept, prompt, anchor in (("Captain Zorb", "a portrait of Captain Zorb", "a portrait of a person"),
                                        ("star", "a star", "an object")):
            for drawn in (prompt, anchor):
                latents = host.sample(mp, host.encode_pooled(clip, drawn), host.encode_pooled(clip, ""), seeds, (4, 4, 4))
                judged = shows_concept(mp, clip, host.process_latent_in(mp, latents), prompt, anchor)
                seen = oracle.detects(oracle_net.predict(host.decode(vae, latents)), concept)
                agree += int((judged == seen.bool()).sum())
                total += len(seeds)
    assert agree / total >= 0.9, f"the judge agreed with the oracle on {agree} of {total} samples"


def test_the_recovery_attack_node_measures_what_the_oracle_sees(toy, oracle_net):
    """Captain Zorb forgotten with the defaults, then attacked through the node: the
    judge and the oracle agree on whether the attack brought him back (on the last
    measurement the judge said 1.00 and the oracle 0.75 of 16 samples: the judge also
    counts half-recovered portraits), and the references hold (the original model's
    samples of his prompt show him, the patched model's do not). How often the attack
    succeeds is the benchmark's figure (`make bench-quality`), not this test's."""
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget
    from fmn_pack.toybench import probes
    mp, clip, vae = toy
    with torch.inference_mode():
        latents = probes.concept_latents(mp, vae, "Captain Zorb")
        result = forget(mp, clip, parse_concepts("Captain Zorb | identity"), ForgetConfig(resolution=32), {0: latents})
        patched = host.apply_lora(mp, result.lora, 1.0)
        out = NODE_CLASS_MAPPINGS["FMN_RecoveryAttack"]().attack(
            mp, patched, clip, "Captain Zorb | identity", "person", 4, 150, 1e-2, 0, 16,
            latent={"samples": host.process_latent_out(mp, latents)}, templates="a portrait of {}")
        rate, samples, report = out["result"]
        seen = float(oracle.detects(oracle_net.predict(host.decode(vae, samples["samples"])), "Captain Zorb").float().mean())
    rates = {name: float(re.search(rf"\| the concept's prompt, {name} model \| ([0-9.]+) \|", report).group(1))
             for name in ("patched", "original")}
    assert (rate > 0.5) == (seen > 0.5), (rate, seen, report)
    assert rates["original"] >= 0.75 and rates["patched"] <= 0.25, report


def test_the_recovery_attack_reads_a_token_rows_patch_through_its_clip(toy):
    """A 'token rows' patch leaves the UNet as it was and edits the CLIP: the attack node
    samples the patched pipeline through `patched_clip` (there Captain Zorb's prompt no
    longer shows him), while the judge reads the original CLIP. Handed the original CLIP
    alone, the patched model is the original one and his prompt shows him."""
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.patch import ForgetPatch, apply_patch_with_clip
    from fmn_pack.fmn_core.train import ForgetConfig, forget
    from fmn_pack.toybench import probes
    mp, clip, vae = toy
    node = NODE_CLASS_MAPPINGS["FMN_RecoveryAttack"]()
    with torch.inference_mode():
        latents = probes.concept_latents(mp, vae, "Captain Zorb")
        result = forget(mp, clip, parse_concepts("Captain Zorb | identity"), ForgetConfig(resolution=32, mode="token rows"),
                        {0: latents})
        patched, patched_clip = apply_patch_with_clip(mp, clip, ForgetPatch(result.lora, result.metadata), 1.0)
        latent = {"samples": host.process_latent_out(mp, latents)}
        reports = {name: node.attack(mp, patched, clip, "Captain Zorb | identity", "person", 4, 5, 1e-2, 0, 8, latent=latent,
                                     templates="a portrait of {}", **extra)["result"][2]
                   for name, extra in (("with", {"patched_clip": patched_clip}), ("without", {}))}
    rates = {(which, name): float(re.search(rf"\| the concept's prompt, {name} model \| ([0-9.]+) \|", report).group(1))
             for which, report in reports.items() for name in ("patched", "original")}
    assert rates["with", "original"] >= 0.75 and rates["without", "original"] >= 0.75, reports
    assert rates["with", "patched"] <= 0.25 and rates["without", "patched"] >= 0.75, reports
