"""Figure 10: the in-run checks' share of one default run run to its whole budget: their
seconds over the run's (checks and training steps), the issue's "at most 10 % of a default
run"; the checks over the training steps alone, the stricter ratio, beside it."""
from __future__ import annotations

from .common import CONCEPT_LINES, self_check_figures

# The default resolution on a GPU. On a CPU a check's six-row forwards at 512 px (4,096
# tokens a self-attention) did not finish the warm-up run's two checks in 15 minutes, so
# the figure is taken at 256 px there; the share compares forwards of the same model at
# the same size, so it moves little with the resolution, and the JSON says which it was.
GPU_RESOLUTION, CPU_RESOLUTION = 512, 256


def bench_self_check_share(pack, cfg: dict) -> dict:
    """Figure 10: one default run (150 steps; 512 px on a GPU, 256 on a CPU) to its whole
    budget on the small SD1.5-layout model; the checks and the training steps are timed
    inside that one run (wall clock, side by side), so the share does not depend on how
    busy the machine is over minutes."""
    import host_models
    import torch
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget

    patcher, clip = host_models.sd15_model(seed=0), host_models.sd1_clip(seed=1)
    concept = parse_concepts(CONCEPT_LINES[0])
    resolution = GPU_RESOLUTION if torch.cuda.is_available() else CPU_RESOLUTION
    forget(patcher, clip, concept, ForgetConfig(steps=2, check_every=1, resolution=resolution))  # warm-up
    whole = forget(patcher, clip, concept, ForgetConfig(target=0.0, resolution=resolution)).report
    figures = self_check_figures(whole)
    return {
        "value": figures["share_of_run"],
        "bound": 0.10,
        "over_training": figures["over_training"],
        "what": ("seconds of the in-run checks (encoding their prompts, the original predictions before the first "
                 "step, every check, the final collateral and attention measurement) over the seconds of the "
                 "run (the checks and the training steps, timed apart; over_training: the checks over the "
                 "training steps alone), in one "
                 f"forget() run of '{CONCEPT_LINES[0]}' with the default ForgetConfig but target 0 "
                 f"({whole.budget} steps, checks every {ForgetConfig().check_every}) at {resolution} px, the tests' "
                 "small SD1.5-layout model; wall clock inside the run"),
        "resolution": resolution,
        "run": figures,
    }
