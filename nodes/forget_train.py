"""FMN_ForgetTrain, shown as "Forget Train (Advanced)": attention re-steering from a list of
concepts to a patched MODEL, with every knob. The simple "Forget Train" node
(`forget_train_simple.py`) runs the same training at these defaults.

Mode list: the nodes offer the modes meant for use (`modes.USER_MODES`). The benchmark's
recipes ('aimed k', 'k/v', 'all attn2', 'reference') are not listed, but a workflow saved
when they were, or a prompt sent through the API, that names one still validates and runs
it: the node checks `mode` itself (VALIDATE_INPUTS takes every input, so the host's own
combo check is off) against every registered mode."""
from __future__ import annotations

import logging

from ..fmn_core import check_report, host
from ..fmn_core.concepts import parse_concepts, parse_keep
from ..fmn_core.loss_plot import loss_plot
from ..fmn_core.report_plot import report_image
from ..fmn_core.patch import ForgetPatch, apply_patch_with_clip
from ..fmn_core.token_rows import OUTPUT_SCALE
from ..fmn_core.train import MAX_TARGET, MODES, USER_MODES, ForgetConfig, forget, latents_for_concepts
from .memory_inputs import memory_inputs
from .checkpoint_inputs import NO_RESUME, checkpoints, resume_input, resume_path, save_every_input
from .patches import FOLDER

log = logging.getLogger(__name__)
DEFAULTS = ForgetConfig()
CONCEPTS_TOOLTIP = (
    "One concept per line. Optional fields after '|': a category (object, style, identity) or a "
    "template with {} (e.g. 'a photo of {} at night'), and images=A-B to say which input images "
    "show this concept. Examples: 'Van Gogh | style', 'embedding:my_cat | identity | images=0-3'. "
    "'preset:nsfw' adds the NSFW preset's eight words (docs/nodes.md, 'Removing NSFW content': what it does and cannot promise)."
)

KEEP_TOOLTIP = (
    "Concepts to keep, comma- or line-separated (e.g. 'Monet, Picasso' when forgetting Van Gogh). Training "
    "also holds the original model's output on their prompts and on the concepts' prompts with them added, "
    "so neighbours and combinations survive. An item may also be a whole prompt without commas that you use "
    "and want kept close to how it was. Empty: no preservation term."
)
WARM_START_TOOLTIP = ("Start from a closed-form edit of the keys and values (as UCE computes it from text alone: the "
                      "concept's tokens read as the anchor's) inside the aimed directions, then re-steer attention "
                      "as usual. On ToyBench it lifted the hardest concept (star) from H 0.86 to 0.91. It runs for up "
                      "to 3 concepts at once, or any number with a keep list (beyond that it moved the neighbours "
                      "more than it helped). Aimed modes, and 'token rows', whose rows then start from the "
                      "anchor's words; the other modes ignore it.")
NEGATIVE_GUIDANCE_TOOLTIP = ("How far the output term's target lies beyond the anchor, away from the concept (as ESD's "
                             "negative guidance): the anchor's prediction minus this times (the concept's prediction minus "
                             "the anchor's). 0 = the anchor's prediction itself. It also erases where a noisy image already "
                             "shows the concept; needs output_weight above 0.")
TARGET_TOOLTIP = ("Stop once the run's own check says every concept is erased this far: its held-out prompts' "
                  "prediction has moved this share of the way from the original's to the anchor prompt's (1 = all the "
                  "way; negative guidance aims past it). Checked every "
                  f"{DEFAULTS.check_every} steps, so steps is a budget. 0 = always run every step (still measured).")
WATCH_TOOLTIP = ("Concepts to measure but not train on, comma- or line-separated (e.g. 'Monet, Picasso' when "
                 "forgetting Van Gogh): the report says how far each one's prompts moved, as a share of how far the "
                 "concept's own moved. Changes nothing in the patch. Empty: only the keep list and a few ordinary "
                 "prompts are measured.")
MODE_TOOLTIP = ("Which weights train. " + "; ".join(f"'{name}': {MODES[name].description}" for name in USER_MODES)
                + ". (A workflow that names one of the benchmark's recipes still runs it.)")


class ForgetTrain:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Makes the model forget the given concepts by lowering the cross-attention their words "
                   "receive (Forget-Me-Not attention re-steering) and by making their prompts denoise like the "
                   "same prompts with an anchor ('a person', 'an object', or nothing) in their place. Outputs the "
                   "patched model and a small patch that can be saved, shared and stacked like a LoRA.")
    RETURN_TYPES = ("MODEL", "FORGET_PATCH", "IMAGE", "CLIP", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "patch", "loss_plot", "clip", "report", "report_text")
    OUTPUT_TOOLTIPS = ("The input model with the forget patch applied (the input itself is unchanged).",
                       "The forget patch: connect it to Save Forget Patch or Apply Forget Patch.",
                       "The training loss per step and its smoothed trend: connect a Preview Image to see the run converge.",
                       "The CLIP with the patch's text-encoder side applied (mode 'token rows'; the input CLIP itself "
                       "in the other modes): encode prompts with it.",
                       "The run's own measurement as a picture: each concept's erasure at every check, the target, and "
                       "the final table (erasure per noise level, what else moved, attention). Connect a Preview Image.",
                       "The same report as text, for a Show Text node or a file.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model that should forget (SD1.x, SD2.x or SDXL)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of that model: it locates the concept's tokens."}),
                "concepts": ("STRING", {"multiline": True, "default": "Van Gogh | style", "tooltip": CONCEPTS_TOOLTIP}),
                "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 10000,
                                  "tooltip": "Training steps, taken by the concepts in turn: raise them with the concept count. More steps forget more strongly; the paper uses 35 for one concept."}),
                "learning_rate": ("FLOAT", {"default": DEFAULTS.learning_rate, "min": 1e-6, "max": 0.5, "step": 1e-4,
                                            "round": False, "tooltip": "AdamW learning rate of the patch. Higher forgets faster but disturbs more."}),
                "rank": ("INT", {"default": DEFAULTS.rank, "min": 1, "max": 64,
                                 "tooltip": "Rank of the patch per concept. Higher can hold longer concepts; the file grows linearly."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed for prompts, timesteps and noise: the same seed gives the same patch."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Images of the concepts (encoded with the VAE). Without images, pure noise is used as in the paper."}),
                "vae": ("VAE", {"tooltip": "Encodes the images; needed when images are connected."}),
                "latent": ("LATENT", {"tooltip": "Already encoded concept latents, instead of images."}),
                "mode": (list(USER_MODES), {"default": DEFAULTS.mode, "tooltip": MODE_TOOLTIP}),
                "include_end_token": ("BOOLEAN", {"default": DEFAULTS.include_end_token,
                                                  "tooltip": "Also lower attention on the prompt's end token, which summarises the whole prompt."}),
                "batch_size": ("INT", {"default": DEFAULTS.batch_size, "min": 1, "max": 64, "tooltip": "Samples per training step."}),
                "resolution": ("INT", {"default": DEFAULTS.resolution, "min": 32, "max": 2048, "step": 8,
                                       "tooltip": "Pixel size of the noise latents used when no images are given."}),
                "output_weight": ("FLOAT", {"default": DEFAULTS.output_weight, "min": 0.0, "max": 1000.0, "step": 0.5,
                                            "tooltip": "Weight of the output term: the concept's prompts should denoise like the same "
                                                       "prompts with the anchor in its place. 0 = the paper's attention loss alone. "
                                                       f"Mode 'token rows' weighs it {OUTPUT_SCALE:g} times as much (the output "
                                                       "term leads there)."}),
                "keep": ("STRING", {"multiline": True, "default": "", "tooltip": KEEP_TOOLTIP}),
                "save_every": save_every_input("patch", FOLDER),
                "checkpoint_name": ("STRING", {"default": "forget_checkpoint",
                                               "tooltip": "File name stem (<name>) of the checkpoints save_every writes."}),
                "resume_from": resume_input(FOLDER),
                **memory_inputs(),
                "warm_start": ("BOOLEAN", {"default": DEFAULTS.warm_start, "tooltip": WARM_START_TOOLTIP}),
                "negative_guidance": ("FLOAT", {"default": DEFAULTS.negative_guidance, "min": 0.0, "max": 10.0, "step": 0.1,
                                                "tooltip": NEGATIVE_GUIDANCE_TOOLTIP}),
                "target": ("FLOAT", {"default": DEFAULTS.target, "min": 0.0, "max": MAX_TARGET, "step": 0.05,
                                     "tooltip": TARGET_TOOLTIP}),
                "watch": ("STRING", {"multiline": True, "default": "", "tooltip": WATCH_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concepts=None, keep="", mode=DEFAULTS.mode, watch="", **_):
        if isinstance(mode, str) and mode not in MODES:
            return f"unknown mode {mode!r}: use one of {', '.join(USER_MODES)}"
        if isinstance(concepts, str):
            try:
                parsed = parse_concepts(concepts)
                parse_keep(keep if isinstance(keep, str) else "", parsed)
                parse_keep(watch if isinstance(watch, str) else "", parsed, "watch")
            except ValueError as e:
                return str(e)
        return True

    def train(self, model, clip, concepts, steps, learning_rate, rank, seed, images=None, vae=None, latent=None,
              mode=DEFAULTS.mode, include_end_token=DEFAULTS.include_end_token, batch_size=DEFAULTS.batch_size,
              resolution=DEFAULTS.resolution, output_weight=DEFAULTS.output_weight, keep="",
              save_every=0, checkpoint_name="forget_checkpoint", resume_from=NO_RESUME,
              precision=DEFAULTS.precision, gradient_checkpointing=DEFAULTS.gradient_checkpointing,
              warm_start=DEFAULTS.warm_start, negative_guidance=DEFAULTS.negative_guidance, target=DEFAULTS.target,
              watch=""):
        parsed = parse_concepts(concepts)
        config = ForgetConfig(steps=steps, learning_rate=learning_rate, rank=rank, seed=seed, mode=mode,
                              batch_size=batch_size, include_end_token=include_end_token, resolution=resolution,
                              output_weight=output_weight, negative_guidance=negative_guidance,
                              keep=parse_keep(keep, parsed), precision=precision,
                              gradient_checkpointing=gradient_checkpointing, warm_start=warm_start, target=target,
                              watch=parse_keep(watch, parsed, "watch"))
        latents = latents_for_concepts(model, parsed, images=images, vae=vae, latent=latent)
        result = forget(model, clip, parsed, config, latents, progress=host.Progress(steps),
                        checkpoints=checkpoints(FOLDER, save_every, checkpoint_name), resume=resume_path(FOLDER, resume_from))
        patch = ForgetPatch(result.lora, result.metadata)
        patched_model, patched_clip = apply_patch_with_clip(model, clip, patch, 1.0)
        report = result.report
        for warning in check_report.warnings(report):
            log.warning("Forget Train: %s", warning)
        ui = {"fmn_report": [{"verdict": check_report.verdict(report), "warnings": check_report.warnings(report)}]}
        return {"ui": ui, "result": (patched_model, patch, loss_plot(result.losses, "Forget Train"), patched_clip,
                                     report_image(report), check_report.table(report))}
