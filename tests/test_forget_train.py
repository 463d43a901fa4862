"""Forget Train on small SD1- and SD2-layout models built from the host's own classes."""
import pytest
import torch

import comfy.model_management
import host_models as hm
from attention_checks import PAPER_BUDGET, PROMPTS_WITHOUT_CONCEPT, RESOLUTION, concept_share_ratio, worst_word_change
from fmn_pack.fmn_core import host
from fmn_pack.fmn_core.concepts import keep_prompts, parse_concepts, parse_keep, with_kept
from fmn_pack.fmn_core.train import ForgetConfig, forget

CONCEPT = "van gogh"


# The attention-level checks run at the paper's budget (PAPER_BUDGET); ToyBench measures
# the pack's defaults.


def train(model, clip, mode="aimed k/v", **overrides):
    config = ForgetConfig(resolution=RESOLUTION, mode=mode, **{**PAPER_BUDGET, **overrides})
    return forget(model, clip, parse_concepts(f"{CONCEPT} | style"), config)


@pytest.fixture(scope="module")
def sd1():
    return hm.sd15_model(), hm.sd1_clip()


@pytest.fixture(scope="module")
def sd1_result(sd1):
    return train(*sd1)


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_aimed_update_forgets_the_concept_and_keeps_other_words(layout, sd1, sd1_result):
    model, clip = sd1 if layout == "sd1" else (hm.sd2_model(), hm.sd2_clip())
    result = sd1_result if layout == "sd1" else train(model, clip)
    assert len(host.attn2_layers(model)) == 16
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    patched = host.apply_lora(model, result.lora, 1.0)
    ratio = concept_share_ratio(model, patched, clip, CONCEPT)
    assert ratio <= 0.5, f"concept attention share only fell to {ratio:.2f} of before on held-out prompts"
    worst = worst_word_change(model, patched, clip)
    assert worst < 0.25, f"a word of a prompt without the concept moved by {worst:.0%}"


def test_naive_update_disturbs_other_words_where_the_aimed_one_does_not(sd1, sd1_result):
    """The same budget without aim moves unrelated words far more: the aim is what keeps them."""
    model, clip = sd1
    naive = train(model, clip, mode="k/v")
    naive_change = worst_word_change(model, host.apply_lora(model, naive.lora, 1.0), clip)
    aimed_change = worst_word_change(model, host.apply_lora(model, sd1_result.lora, 1.0), clip)
    assert naive_change > 0.3 and aimed_change < naive_change / 2, (naive_change, aimed_change)


def test_only_attn2_weights_differ_after_applying(sd1, sd1_result):
    model, _ = sd1
    comfy.model_management.load_models_gpu([model])  # the host patches shared weights in place: load the original
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    patched = host.apply_lora(model, sd1_result.lora, 1.0)
    comfy.model_management.load_models_gpu([patched])
    after = patched.model.diffusion_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), sorted(changed)[:5]
    # every key projection moves; the last layer's values feed no later attention, so the
    # attention loss leaves them (and only them) unchanged
    assert {k for k in before if ".attn2.to_k." in k} <= changed
    assert len(changed) == 31
    comfy.model_management.load_models_gpu([model])
    assert all(torch.equal(before[k], v) for k, v in model.model.diffusion_model.state_dict().items())


def test_same_seed_gives_the_same_patch(sd1, sd1_result):
    again = train(*sd1)
    assert sd1_result.lora.keys() == again.lora.keys()
    assert all(torch.equal(sd1_result.lora[k], again.lora[k]) for k in again.lora)


def test_gradient_clipping_really_clips(sd1, sd1_result):
    clipped = train(*sd1, steps=5, max_grad_norm=1e-12)
    free = train(*sd1, steps=5)
    size = lambda r: sum(float(v.float().abs().sum()) for k, v in r.lora.items() if "lora_up" in k)  # noqa: E731
    assert size(clipped) < 0.01 * size(free)


def test_several_concepts_with_their_own_templates(sd1):
    model, clip = sd1
    concepts = parse_concepts("van gogh | style\nred fox | object\nmickey mouse | a cartoon of {} waving")
    result = forget(model, clip, concepts, ForgetConfig(steps=6, resolution=RESOLUTION, rank=1, batch_size=3))
    assert result.metadata["fmn.categories"] == '["style", "object", "custom"]'
    assert result.metadata["fmn.rank"] == "3"
    assert next(v for k, v in result.lora.items() if k.endswith("lora_up.weight")).shape[1] == 3


def test_trains_a_model_loaded_under_inference_mode(sd1):
    """Weights loaded by a node are inference tensors; training must still work and leave them as they were."""
    _, clip = sd1
    with torch.inference_mode():
        model = hm.sd15_model(seed=3)
        before = {k: v.clone() for k, v in model.model.state_dict().items()}
        result = train(model, clip, steps=3)
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert torch.isfinite(torch.tensor(result.losses)).all()


def test_anchors_default_by_category_and_can_be_named():
    zorb, star, neon, custom, named = parse_concepts(
        "Captain Zorb | identity\nstar\nneon | style\nMickey | a cartoon of {} waving\nVan Gogh | style | anchor=a painter")
    assert zorb.anchor_prompts()[:2] == ["a photo of a person", "a portrait of a person"]
    assert star.anchor_prompts()[0] == "a photo of an object"
    assert neon.anchor_prompts()[0] == "a painting in the style of"
    assert custom.anchor_prompts() == ["a cartoon of waving"]
    assert named.anchor_prompts()[1] == "an artwork by a painter"


def test_keep_list_is_parsed_and_may_not_overlap_the_concepts():
    concepts = parse_concepts("Van Gogh | style\nstar")
    assert parse_keep("Monet,  Claude   Lorrain\n\nMonet, star trek", concepts) == ("Monet", "Claude Lorrain", "star trek")
    with pytest.raises(ValueError, match="in both the forget and the keep list"):
        parse_keep("monet, van gogh", concepts)
    star = with_kept(concepts[1], ("zebra", "a {curly} word"))
    assert len(star.templates) == 5 * 3
    assert star.prompts()[5:7] == ["a photo of star, zebra", "a photo of star, a {curly} word"]
    assert star.anchor_prompts()[5] == "a photo of an object, zebra"
    assert keep_prompts(("zebra",)) == ["a photo of zebra", "a painting of zebra", "zebra"]


def test_prompts_named_in_keep_hold_their_attention_while_the_concept_loses_its_own(sd1):
    """On a random-weight text encoder an unseen word is a new direction that no aim can
    avoid (scripts/bench_attention_bound.py); a prompt named in `keep` is seen, and the aim
    avoids its contexts. Same budget, same erasure, with and without the keep list."""
    model, clip = sd1
    budget = {"steps": 150, "learning_rate": 3e-2}
    held = train(model, clip, keep=tuple(PROMPTS_WITHOUT_CONCEPT), **budget)
    free = train(model, clip, **budget)
    held, free = (host.apply_lora(model, result.lora, 1.0) for result in (held, free))
    for patched in (held, free):
        assert concept_share_ratio(model, patched, clip, CONCEPT) <= 0.25
    assert worst_word_change(model, held, clip) < 0.05
    assert worst_word_change(model, free, clip) > 0.5


def test_the_nsfw_preset_forgets_its_words_towards_clothed_figures(sd1):
    """`preset:nsfw` is eight text-only concept lines whose prompts are steered to the same
    sentence about a clothed figure; at the attention level each word's share halves on
    held-out prompts, and the aim keeps prompts without them far steadier than the same
    budget without it (eight concepts at once move other words more than one does:
    measured 0.41 against 0.99; the shares fall to 0.23-0.27 of before)."""
    model, clip = sd1
    concepts = parse_concepts("preset:nsfw")
    assert [c.text for c in concepts] == ["nude", "naked", "nudity", "topless", "erotic", "sexual", "nsfw", "explicit"]
    assert concepts[1].prompts()[0] == "a photo of a naked woman" and concepts[1].anchor_prompts()[0] == "a photo of a clothed woman"
    with pytest.raises(ValueError, match="unknown preset 'gore'.*preset:nsfw"):
        parse_concepts("preset:gore")
    budget = {**PAPER_BUDGET, "steps": 160}
    patched, naive = (host.apply_lora(model, forget(model, clip, concepts, ForgetConfig(resolution=RESOLUTION, mode=mode, **budget)).lora, 1.0)
                      for mode in ("aimed k/v", "k/v"))
    ratios = {word: concept_share_ratio(model, patched, clip, word) for word in ("naked", "nude", "erotic")}
    assert max(ratios.values()) <= 0.5, ratios
    aimed_change, naive_change = worst_word_change(model, patched, clip), worst_word_change(model, naive, clip)
    assert aimed_change < naive_change / 2, (aimed_change, naive_change)


def test_the_warm_start_edits_the_concepts_keys_towards_the_anchor_and_spares_other_prompts(sd1):
    """The closed-form start alone (before any re-steering step): on every to_k/to_v
    layer the concept's rows read much closer to their anchor targets, ordinary prompts'
    rows barely move."""
    from fmn_pack.fmn_core.concepts import preserve_prompts
    from fmn_pack.fmn_core.train import MODES, build_deltas, build_examples, concept_basis, preserved, warm_start
    model, clip = sd1
    with torch.inference_mode():
        examples = build_examples(clip, parse_concepts(f"{CONCEPT} | style"), False)
        ordinary = host.encode_many(clip, preserve_prompts()[:6]).reshape(-1, 768).double()
    with torch.inference_mode(False):
        preserve = preserved(clip, examples)
        basis, _ = concept_basis(examples, preserve, 1, 2)
        deltas = build_deltas(model, host.attn2_layers(model), MODES["aimed k/v"], basis.shape[1], basis,
                              torch.Generator().manual_seed(0))
        with host.trainable_unet(model, {}):  # as Forget Train does: the model's own weights loaded
            warm_start(model, deltas, examples, preserve)
            state = {k: v.detach().clone() for k, v in model.model.state_dict().items() if k in deltas}
    rows = torch.cat([e.edit_rows for e in examples]).double()
    targets = torch.cat([e.edit_targets for e in examples]).double()
    for key, delta in deltas.items():
        weight, change = state[key].double(), delta.delta().detach().double()
        before = ((targets - rows) @ weight.T).norm()
        after = ((targets - rows) @ weight.T - rows @ change.T).norm()
        moved = (ordinary @ change.T).norm() / (ordinary @ weight.T).norm()
        assert after < 0.7 * before, f"{key}: the concept's rows moved only {1 - after / before:.2f} of the way"
        assert moved < 0.05, f"{key}: ordinary prompts' rows moved {moved:.3f}"


def test_the_warm_start_runs_for_a_few_concepts_or_with_a_keep_list():
    """Beyond WARM_START_MAX_CONCEPTS concepts with no keep list the closed-form edit is
    skipped (it moved the neighbours more than it helped), and the patch says so."""
    from fmn_pack.fmn_core.train import WARM_START_MAX_CONCEPTS
    config, few, many = ForgetConfig(), WARM_START_MAX_CONCEPTS, WARM_START_MAX_CONCEPTS + 1
    assert config.warm_starts(few) and not config.warm_starts(many)
    assert ForgetConfig(keep=("zebra",)).warm_starts(many)
    assert not ForgetConfig(warm_start=False).warm_starts(1) and not ForgetConfig(mode="k/v").warm_starts(1)
