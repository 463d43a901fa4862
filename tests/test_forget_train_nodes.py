"""The two Forget Train nodes (issue 30, part 1): the simple one ("Forget Train",
FMN_ForgetTrainSimple) trains with the advanced one's defaults, the advanced one
(FMN_ForgetTrain, now "Forget Train (Advanced)") keeps its id and input order, and the
benchmark's recipes leave its mode list but still run when a saved workflow names one."""
import pytest

from fmn_pack import nodes
from fmn_pack.fmn_core.concepts import parse_concepts
from fmn_pack.fmn_core.train import MODES, USER_MODES, ForgetConfig
from fmn_pack.nodes import NODE_CLASS_MAPPINGS as NODES
from fmn_pack.nodes import NODE_DISPLAY_NAME_MAPPINGS as NAMES
from fmn_pack.nodes import forget_train

SIMPLE, ADVANCED = NODES["FMN_ForgetTrainSimple"], NODES["FMN_ForgetTrain"]
BENCHMARK_RECIPES = ("aimed k", "k/v", "all attn2", "reference")
# FMN_ForgetTrain's inputs in the order saved workflows store their widget values (538ed3f).
ADVANCED_ORDER = ["model", "clip", "concepts", "steps", "learning_rate", "rank", "seed", "images", "vae", "latent",
                  "mode", "include_end_token", "batch_size", "resolution", "output_weight", "keep", "save_every",
                  "checkpoint_name", "resume_from", "precision", "gradient_checkpointing", "warm_start",
                  "negative_guidance", "target"]


def input_names(node) -> list[str]:
    spec = node.INPUT_TYPES()
    return [*spec["required"], *spec.get("optional", {})]


def test_the_simple_node_shows_the_few_inputs_and_the_advanced_one_keeps_its_id_and_order():
    assert NAMES["FMN_ForgetTrainSimple"] == "Forget Train" and NAMES["FMN_ForgetTrain"] == "Forget Train (Advanced)"
    assert list(SIMPLE.INPUT_TYPES()["required"]) == ["model", "clip", "concepts", "steps", "seed"]
    assert list(SIMPLE.INPUT_TYPES()["optional"]) == ["images", "vae", "keep"]
    assert input_names(ADVANCED)[:len(ADVANCED_ORDER)] == ADVANCED_ORDER
    assert SIMPLE.RETURN_TYPES == ADVANCED.RETURN_TYPES and SIMPLE.RETURN_NAMES == ADVANCED.RETURN_NAMES
    assert [n for n, *_ in nodes.NODES].index("FMN_ForgetTrainSimple") < [n for n, *_ in nodes.NODES].index(
        "FMN_ForgetTrain"), "the simple node comes first in the menu"


def test_the_benchmark_recipes_leave_the_mode_list_but_still_validate():
    listed = ADVANCED.INPUT_TYPES()["optional"]["mode"][0]
    assert listed == list(USER_MODES) == ["aimed k/v", "token rows", "gated k"]
    assert not set(BENCHMARK_RECIPES) & set(listed) and set(BENCHMARK_RECIPES) <= set(MODES)
    for mode in BENCHMARK_RECIPES:  # a workflow saved when they were listed still passes validation
        assert ADVANCED.VALIDATE_INPUTS(concepts="star | object", mode=mode) is True
    message = ADVANCED.VALIDATE_INPUTS(concepts="star | object", mode="aimed q")
    assert "unknown mode 'aimed q'" in message and "aimed k/v" in message


class Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Each node's call of `forget`, stopped there: its config and inputs."""
    calls = []

    def forget(model, clip, concepts, config, latents, **options):
        calls.append((concepts, config, latents, options))
        raise Captured

    monkeypatch.setattr(forget_train, "forget", forget)
    monkeypatch.setattr(forget_train, "latents_for_concepts", lambda model, parsed, images, vae, latent: {"images": images})
    return calls


def test_the_simple_node_trains_with_the_advanced_nodes_defaults(captured):
    with pytest.raises(Captured):
        SIMPLE().train("model", "clip", "star | object", 40, 7, images="pictures", vae="vae", keep="moon")
    with pytest.raises(Captured):
        ADVANCED().train("model", "clip", "star | object", 40, ForgetConfig.learning_rate, ForgetConfig.rank, 7,
                         images="pictures", vae="vae", keep="moon")
    (concepts, simple, latents, options), (_, advanced, _, advanced_options) = captured
    assert simple == advanced == ForgetConfig(steps=40, seed=7, keep=("moon",))
    assert concepts == parse_concepts("star | object") and latents == {"images": "pictures"}
    assert options["checkpoints"] is None and options["resume"] is None
    assert options["progress"]._bar.total == advanced_options["progress"]._bar.total == 40


def test_the_simple_node_validates_its_concepts_and_keep_list():
    assert SIMPLE.VALIDATE_INPUTS(concepts="star | object", keep="moon") is True
    assert SIMPLE.VALIDATE_INPUTS(concepts="star | object", keep="star") == ADVANCED.VALIDATE_INPUTS(
        concepts="star | object", keep="star")
