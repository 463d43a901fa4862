"""FMN_ForgetTrainSimple, shown as "Forget Train": the concepts, the model, and a step budget.
Everything else is at the defaults of `ForgetConfig`, the same ones the advanced node
(FMN_ForgetTrain, "Forget Train (Advanced)") shows, so both train the same patch from the
same inputs."""
from __future__ import annotations

from .forget_train import CONCEPTS_TOOLTIP, DEFAULTS, KEEP_TOOLTIP, ForgetTrain

STEPS_TOOLTIP = ("The most training steps, taken by the concepts in turn: the run stops earlier once its own check "
                 f"says every concept is erased (checked every {DEFAULTS.check_every} steps). Raise it with the "
                 "concept count.")


class ForgetTrainSimple:
    CATEGORY = ForgetTrain.CATEGORY
    DESCRIPTION = ("Makes the model forget the given concepts and says how well it did. Connect the MODEL and CLIP, "
                   "write the concepts, and optionally images of them (with the VAE) and concepts to keep. The other "
                   "settings are the defaults of Forget Train (Advanced), which shows every knob.")
    RETURN_TYPES = ForgetTrain.RETURN_TYPES
    RETURN_NAMES = ForgetTrain.RETURN_NAMES
    OUTPUT_TOOLTIPS = ForgetTrain.OUTPUT_TOOLTIPS
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        advanced = ForgetTrain.INPUT_TYPES()
        required, optional = advanced["required"], advanced["optional"]
        return {
            "required": {
                "model": required["model"],
                "clip": required["clip"],
                "concepts": ("STRING", {"multiline": True, "default": "Van Gogh | style", "tooltip": CONCEPTS_TOOLTIP}),
                "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 10000, "tooltip": STEPS_TOOLTIP}),
                "seed": required["seed"],
            },
            "optional": {
                "images": optional["images"],
                "vae": optional["vae"],
                "keep": ("STRING", {"multiline": True, "default": "", "tooltip": KEEP_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, concepts=None, keep="", **_):
        return ForgetTrain.VALIDATE_INPUTS(concepts=concepts, keep=keep)

    def train(self, model, clip, concepts, steps, seed, images=None, vae=None, keep=""):
        return ForgetTrain().train(model, clip, concepts, steps, DEFAULTS.learning_rate, DEFAULTS.rank, seed,
                                   images=images, vae=vae, keep=keep)
