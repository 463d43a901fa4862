"""Forget Train's in-run checks (fmn_core/checks.py) on small SD1-layout models built from
the host's own classes: each signal pinned where its value is known, held-out material,
stopping on the target, and the report in the patch header."""
import contextlib
import dataclasses
import json
import types

import pytest
import torch

import host_models as hm
from fmn_pack.fmn_core import check_report, checks, host, loop
from fmn_pack.fmn_core.attention import ColumnEnergy, Routed, make_attn2_replace
from fmn_pack.fmn_core.concepts import TEMPLATES, parse_concepts
from fmn_pack.fmn_core.merge import merge_patches
from fmn_pack.fmn_core.patch import ForgetPatch, load_patch, save_patch
from fmn_pack.fmn_core.train import MAX_TARGET, ForgetConfig, forget

RESOLUTION = 64
CONCEPTS = "van gogh | style"


@pytest.fixture(scope="module")
def sd1():
    return hm.sd15_model(), hm.sd1_clip()


@contextlib.contextmanager
def measuring(model, clip, patched_context=None, concepts=CONCEPTS, keep=(), watch=()):
    """A SelfCheck on `model` as a run builds it: a clone with the routed attn2 hooks, its
    forward, and the original model's predictions taken at construction."""
    parsed = parse_concepts(concepts)
    shape = (model.model.diffusion_model.in_channels, RESOLUTION // 8, RESOLUTION // 8)
    stuff = checks.material(clip, parsed, keep, host.model_sampling(model), shape, watch=watch)
    route = Routed(ColumnEnergy())
    clone = model.clone()
    host.register_attn2(clone, host.attn2_layers(clone), lambda layer, prev: make_attn2_replace(layer.module, route, prev))
    with torch.inference_mode(False), host.trainable_unet(clone, {}) as unet:
        yield checks.SelfCheck(stuff, unet, contextlib.nullcontext, route, 0.0, 1, 1, patched_context)


@pytest.mark.parametrize("inference", [True, False], ids=["inference mode", "outside it"])
def test_an_unchanged_model_reads_no_erasure_and_no_collateral(sd1, inference):
    model, clip = sd1
    with torch.inference_mode(inference), measuring(model, clip, watch=("monet",)) as check:
        check.check(1)
        report = check.finish(1, 0.0)
    assert report.erasure == [0.0] and report.erasure_by_level == [[0.0, 0.0, 0.0]]
    assert report.watched == {"monet": 0.0} and report.collateral_watched == 0.0
    assert report.collateral == 0.0 and report.collateral_relative == 0.0 and report.worst_word_change == 0.0
    assert report.concept_share_before == report.concept_share_after and report.concept_share_before[0] > 0


@pytest.mark.parametrize("inference", [True, False], ids=["inference mode", "outside it"])
def test_a_model_that_reads_the_concept_as_its_anchor_reads_erasure_one(sd1, inference):
    """The patched side of each held-out concept prompt is the anchor prompt itself: its
    prediction is then exactly the original's for the anchor."""
    model, clip = sd1
    anchors = [host.encode_pooled(clip, p) for p in checks.held_out(parse_concepts(CONCEPTS)[0]).anchor_prompts()]
    originals = [host.encode_pooled(clip, p) for p in checks.held_out(parse_concepts(CONCEPTS)[0]).prompts()]

    def context(concept: int, prompt: int, edited: bool):
        return (anchors if edited else originals)[prompt]

    with torch.inference_mode(inference), measuring(model, clip, context) as check:
        check.check(1)
        report = check.finish(1, 0.0)
    assert report.erasure[0] == pytest.approx(1.0, abs=1e-4)
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in report.erasure_by_level[0])
    assert report.collateral == 0.0  # the ordinary prompts went through unchanged


def test_checks_measure_on_templates_the_run_never_trained_on(sd1):
    model, clip = sd1
    for category, templates in TEMPLATES.items():
        assert not set(checks.CHECK_TEMPLATES[category]) & set(templates), category
    concept = parse_concepts("red fox | a photo of {} at night")[0]
    assert set(checks.held_out(concept).templates) == set(checks.GENERIC_CHECK_TEMPLATES)
    result = run(model, clip, steps=2)
    trained = set(parse_concepts(CONCEPTS)[0].prompts())
    assert result.report.held_out_prompts and not set(result.report.held_out_prompts) & trained


def test_collateral_prompts_leave_out_those_that_name_a_forgotten_concept(sd1):
    _, clip = sd1
    concepts = parse_concepts("cat | object")
    prompts = checks.ordinary_prompts(("zebra",), concepts, clip)
    assert prompts and not any("cat" in p.split(", ") or " cat" in p for p in prompts)
    assert any("zebra" in p for p in prompts)  # the keep list's own prompts are measured


def test_a_watch_list_is_measured_and_changes_nothing_else(sd1):
    """Watched concepts are measured, never trained on: the patch, the other figures and the
    header but for the report's watched figures are those of the same run without them; a
    watched prompt that names the forgotten concept is left out, as collateral's are."""
    model, clip = sd1
    plain = run(model, clip, steps=4, check_every=2, target=0.0)
    watched = run(model, clip, steps=4, check_every=2, target=0.0, watch=("monet", "a van gogh chair", "zebra"))
    assert all(torch.equal(plain.lora[k], watched.lora[k]) for k in plain.lora)
    assert {k for k in plain.metadata if plain.metadata[k] != watched.metadata[k]} == {check_report.REPORT_KEY}
    assert dataclasses.replace(as_written(watched.report), watched=None, collateral_watched=None) == as_written(plain.report)
    assert "watched" not in json.loads(plain.metadata[check_report.REPORT_KEY]), "a run without a watch list writes no watched figures"
    assert list(watched.report.watched) == ["monet", "zebra"] and all(v > 0 for v in watched.report.watched.values())
    assert min(watched.report.watched.values()) <= watched.report.collateral_watched <= max(watched.report.watched.values())
    assert "watched: " in check_report.table(watched.report)
    [back] = check_report.reports_in(watched.metadata)
    assert back.watched == watched.report.watched


def test_a_watched_concept_that_moved_far_is_named_in_a_warning():
    report = check_report.CheckReport(["van gogh"], [""], 1.0, 10, steps=10, met=True, erasure=[1.0],
                                      watched={"monet": check_report.COLLATERAL_WARNING + 0.1, "zebra": 0.01},
                                      collateral_watched=0.3)
    [warning] = check_report.warnings(report)
    assert "monet" in warning and "zebra" not in warning and "keep" in warning


def test_a_concept_both_forgotten_and_watched_is_refused_by_name():
    from fmn_pack.nodes import NODE_CLASS_MAPPINGS
    refusal = NODE_CLASS_MAPPINGS["FMN_ForgetTrain"].VALIDATE_INPUTS(concepts="Van Gogh | style", watch="Monet, van gogh")
    assert refusal == "van gogh: in both the forget and the watch list; remove it from one of them"


def run(model, clip, concepts=CONCEPTS, **overrides):
    config = ForgetConfig(resolution=RESOLUTION, **overrides)
    with torch.inference_mode():
        return forget(model, clip, parse_concepts(concepts), config)


def test_a_run_stops_at_the_first_check_that_meets_its_target_and_says_so(sd1):
    model, clip = sd1
    stopped = run(model, clip, steps=40, check_every=5, target=0.01)
    assert stopped.report.met and stopped.report.steps == 5 and len(stopped.losses) == 5
    assert stopped.metadata["fmn.steps"] == "5" and stopped.report.budget == 40
    assert "target 0.01 met at step 5 of 40" in check_report.verdict(stopped.report)
    fixed = run(model, clip, steps=5, check_every=5, target=0.0)
    assert fixed.lora.keys() == stopped.lora.keys()
    assert all(torch.equal(fixed.lora[k], stopped.lora[k]) for k in fixed.lora), "stopping changed the trained steps"


def test_a_run_that_misses_its_target_uses_its_budget_and_warns(sd1):
    model, clip = sd1
    result = run(model, clip, steps=6, check_every=4, target=MAX_TARGET)
    report = result.report
    assert not report.met and report.steps == 6 and [h["step"] for h in report.history] == [4, 6]
    assert "fell short of target" in check_report.verdict(report)
    assert any("raise steps or learning_rate" in w for w in check_report.warnings(report))


def test_the_checks_and_the_training_steps_are_timed_apart(sd1, monkeypatch):
    """A check between two steps is the checks' time, not the steps' (it once counted as
    both). The run reads a clock that ticks one second a reading and a hundred more at each
    check forward, so the figures are exact: the checks' ten forwards (three before, one at
    each of six checks, one after the last) are theirs, and the steps keep a few ticks."""
    model, clip = sd1
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]
    measure = checks.SelfCheck._run

    def check_forward(self, *args):
        now[0] += 100.0
        return measure(self, *args)
    monkeypatch.setattr(checks.SelfCheck, "_run", check_forward)
    for module in (checks, loop):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock))
    report = run(model, clip, steps=6, check_every=1, target=0.0).report
    assert 1000 <= report.check_seconds < 1100
    assert 0 < report.train_seconds < 100


def test_the_same_seed_gives_the_same_patch_and_report(sd1):
    model, clip = sd1
    first, second = run(model, clip, steps=4, check_every=2, target=0.5), run(model, clip, steps=4, check_every=2, target=0.5)
    assert all(torch.equal(first.lora[k], second.lora[k]) for k in first.lora)
    assert first.metadata == second.metadata  # the header too: the report's seconds stay out of it


@pytest.mark.parametrize("mode", ["token rows", "gated k", "reference"])
def test_every_mode_reports_finite_figures(sd1, mode):
    model, clip = sd1
    rate = {"learning_rate": 1e-4} if mode == "reference" else {}  # whole matrices: the paper's small rate
    report = run(model, clip, steps=3, check_every=3, mode=mode, target=0.0, **rate).report
    figures = report.erasure + [report.collateral, report.collateral_relative, report.worst_word_change]
    assert all(torch.isfinite(torch.tensor(figures))), figures
    assert report.erasure[0] != 0.0, f"mode {mode} changed nothing the checks could see"
    if mode == "token rows":  # prompts without the concept's words reach the UNet as they were
        assert report.collateral == 0.0


def as_written(report: check_report.CheckReport) -> check_report.CheckReport:
    """A report as a patch header keeps it: without the seconds, which differ run to run."""
    return dataclasses.replace(report, **{name: 0.0 for name in check_report.TIMINGS})


def test_the_report_goes_into_the_patch_header_and_back(sd1, tmp_path):
    model, clip = sd1
    result = run(model, clip, steps=4, check_every=2, target=0.0)
    path = save_patch(ForgetPatch(result.lora, result.metadata), tmp_path / "p.safetensors")
    loaded = load_patch(path)
    [report] = check_report.reports_in(loaded.metadata)
    assert report == as_written(result.report)
    assert check_report.verdict(report) in loaded.metadata["modelspec.description"]
    assert check_report.patch_summary(loaded.metadata)["verdict"] == check_report.verdict(report)
    assert json.loads(loaded.metadata[check_report.REPORT_KEY])["history"][-1]["step"] == 4


def test_merge_carries_each_source_runs_report_forward(sd1):
    model, clip = sd1
    first = run(model, clip, steps=2, check_every=2, target=0.0)
    second = run(model, clip, "red fox | object", steps=2, check_every=2, target=0.0)
    with torch.inference_mode():
        merged = merge_patches(clip, [ForgetPatch(first.lora, first.metadata), ForgetPatch(second.lora, second.metadata)])
    assert check_report.reports_in(merged.metadata) == [as_written(first.report), as_written(second.report)]
    assert check_report.patch_summary(merged.metadata)["verdict"].startswith("made from 2 measured run(s)")
    assert "no in-run report" in check_report.patch_summary({})["verdict"]


@pytest.mark.parametrize("target", [-0.1, MAX_TARGET + 0.1])
def test_a_target_out_of_range_is_refused_before_training(sd1, target):
    model, clip = sd1
    with pytest.raises(ValueError, match="target must be between 0"):
        run(model, clip, steps=2, target=target)


def test_checks_that_diverge_stop_the_run_with_a_clear_error(sd1):
    model, clip = sd1
    with torch.inference_mode(), measuring(model, clip) as check:
        real = check.forward
        check.forward = lambda *args: real(*args) * float("nan")  # the hooks still see the attention
        with pytest.raises(RuntimeError, match="checks diverged.*no patch was produced"):
            check.check(1)


@pytest.mark.parametrize("inference", [True, False], ids=["inference mode", "outside it"])
def test_the_node_runs_from_python_with_images_after_sampling_the_same_model(inference):
    """A script or library caller runs outside the host's inference mode: sampling the
    model, then Forget Train with images through the VAE, must work there too."""
    from fmn_pack.nodes import NODE_CLASS_MAPPINGS
    from fmn_pack.toybench import loader, world

    mp, clip, vae = loader.load()
    images = torch.from_numpy(world.images_of("moon", 4, 100))
    with torch.inference_mode(inference):
        host.sample_latent(mp, host.conditioning(clip, "a photo of moon"), host.conditioning(clip, ""), [1],
                           torch.zeros(1, 4, 4, 4), steps=2)
        out = NODE_CLASS_MAPPINGS["FMN_ForgetTrain"]().train(mp, clip, "moon | object", 4, 0.1, 4, 0, resolution=32,
                                                             images=images, vae=vae)
    patch, report = out["result"][1], check_report.reports_in(out["result"][1].metadata)[0]
    assert patch.lora and report.steps == 4 and out["ui"]["fmn_report"][0]["verdict"] == check_report.verdict(report)
    assert out["result"][4].shape[-1] == 3 and out["result"][5].startswith(check_report.verdict(report))


def test_check_batches_join_only_prompts_that_can_share_a_forward():
    """Consecutive prompts of one context length and pooled-ness, at most `size` a forward;
    a prompt over 77 tokens (a longer context) or one with pooled output starts a new batch."""
    def item(tokens: int, pooled: bool = False) -> checks.Item:
        return checks.Item(torch.zeros(1, tokens, 8), torch.zeros(1, 4) if pooled else None, [1])

    items = [item(77), item(77), item(77), item(154), item(77), item(77, pooled=True)]
    batches = checks._batches(items, 2)
    assert [(start, len(group)) for start, group in batches] == [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert [i for _, group in batches for i in group] == items


def test_batched_check_forwards_measure_what_one_forward_per_prompt_does(sd1, monkeypatch):
    """CHECK_ROWS = 3 is one prompt per forward (the checks before batching): the same
    predictions and attention shares, up to float rounding."""
    model, clip = sd1
    measured = {}
    for rows in (3, checks.CHECK_ROWS):
        monkeypatch.setattr(checks, "CHECK_ROWS", rows)
        with measuring(model, clip, keep=("Monet",)) as check:
            measured[rows] = (check.before[0], check.ordinary_before)
    (one, one_ordinary), (batched, batched_ordinary) = measured[3], measured[checks.CHECK_ROWS]
    assert len(one_ordinary.predictions) > checks.CHECK_ROWS  # several batches of ordinary prompts
    for a, b in ((one, batched), (one_ordinary, batched_ordinary)):
        assert torch.allclose(a.predictions, b.predictions, rtol=1e-4, atol=1e-5)
        assert torch.allclose(a.shares, b.shares, rtol=1e-4, atol=1e-6)


def test_the_study_takes_a_retrained_run_for_the_stored_one_only_when_its_figures_reproduce():
    """--remeasure-watched keeps a stored run's oracle figures beside the retrained run's
    watched figures only when the in-run figures show it is the same patch."""
    from quality.self_check import SAME_RUN_TOLERANCE, same_run
    stored = {"steps": 50, "collateral": 0.004, "history": [{"step": 25, "erasure": [0.9]}, {"step": 50, "erasure": [1.1]}]}
    assert same_run(stored, json.loads(json.dumps(stored)))
    assert same_run(stored, {**stored, "collateral": 0.004 + SAME_RUN_TOLERANCE / 2})
    assert not same_run(stored, {**stored, "collateral": 0.0045})
    assert not same_run(stored, {**stored, "steps": 75, "history": stored["history"] + [{"step": 75, "erasure": [1.2]}]})
    assert not same_run(stored, {**stored, "history": [stored["history"][0], {"step": 50, "erasure": [1.01]}]})


def test_the_agreement_ranks_watched_collateral_against_what_the_oracle_lost():
    import self_check_agreement as agreement
    runs = [{"run": str(i), "recipe": "r", "kept": 1 - loss, "erased_before": 1.0, "erased_after": 0.0,
             "self_check": {"erasure_mean": 1.0, "erasure": [1.0], "collateral": 0.01, "collateral_relative": 0.1,
                            **({"collateral_watched": watched} if watched is not None else {})}}
            for i, (loss, watched) in enumerate([(0.0, 0.05), (0.02, 0.1), (0.05, 0.3), (0.01, None)])]
    found = agreement.agreement(runs)
    assert found["runs_watched"] == 3 and found["spearman_collateral_watched"] == 1.0
    assert "runs_watched" not in agreement.agreement(runs[3:])


def test_more_oracle_seeds_read_kept_as_if_every_half_were_scored_together():
    """--more-oracle-seeds rebuilds the stored halves' sums from the stored figures: kept,
    kept_confidence and erased over old and new halves equal score() over all of them."""
    from quality.runs import score
    from quality.self_check import combined_scores, mean_scores
    names = ("a", "b", "c")

    def part(i: int, shift: float) -> tuple[dict, dict]:  # (detections, probabilities) of one half
        return ({c: 0.5 + 0.1 * j + shift * i for j, c in enumerate(names)},
                {c: 0.4 + 0.05 * j + shift * i for j, c in enumerate(names)})
    base, after = [part(i, 0.01) for i in range(4)], [part(i, -0.03) for i in range(4)]
    old_base, old_after = mean_scores(base[:2]), mean_scores(after[:2])
    entry = {**score(old_base[0], old_after[0], ["a"]), "kept_confidence": score(old_base[1], old_after[1], ["a"])["kept"],
             "kept_halves": [score(b[0], a[0], ["a"])["kept"] for b, a in zip(base[:2], after[:2])]}
    more = combined_scores(entry, base[:2], base[2:], after[2:], ["a"])
    whole_base, whole_after = mean_scores(base), mean_scores(after)
    assert more["kept"] == pytest.approx(score(whole_base[0], whole_after[0], ["a"])["kept"], abs=2e-4)
    assert more["kept_confidence"] == pytest.approx(score(whole_base[1], whole_after[1], ["a"])["kept"], abs=2e-4)
    assert more["erased_after"] == pytest.approx(score(whole_base[0], whole_after[0], ["a"])["erased_after"], abs=2e-4)
    assert more["kept_new_seeds"] == pytest.approx(score(*[mean_scores(x[2:])[0] for x in (base, after)], ["a"])["kept"], abs=2e-4)
    assert len(more["kept_halves"]) == 4


def test_the_agreement_on_more_seeds_sets_both_seed_sets_side_by_side():
    import self_check_agreement as agreement
    runs = [{"run": str(i), "recipe": "r", "kept": 1 - old, "erased_before": 1.0, "erased_after": 0.0,
             "more_seeds": {"kept": 1 - new, "kept_confidence": 1 - new, "kept_new_seeds": 1 - 2 * new + old,
                            "erased_before": 1.0, "erased_after": 0.0},
             "self_check": {"erasure_mean": 1.0, "erasure": [1.0], "collateral": 0.01, "collateral_relative": 0.1,
                            "collateral_watched": watched}}
            for i, (old, new, watched) in enumerate([(0.03, 0.0, 0.05), (0.0, 0.02, 0.1), (0.01, 0.05, 0.3)])]
    more = agreement.agreement(runs)["more_seeds"]
    assert more["runs"] == 3 and more["spearman_collateral_watched"] == 1.0
    assert more["study_seeds_same_runs"]["spearman_collateral_watched"] == -0.5
    assert "more_seeds" not in agreement.agreement(runs[:2])
