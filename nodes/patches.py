"""Apply, load and save forget patches."""
from __future__ import annotations

import hashlib
import os

import folder_paths

from ..fmn_core.check_report import patch_summary
from ..fmn_core.files import inside, safe_filename
from ..fmn_core.merge import PRESERVE_WEIGHT, merge_patches
from ..fmn_core.patch import STRENGTH_RANGE, apply_patch_with_clip, load_patch, save_patch, with_cover

FOLDER = "forget_patches"


def register_folder() -> None:
    """models/forget_patches, added after (never over) any paths from extra_model_paths.yaml;
    then every forget_patches folder is also appended to the LoRA folders, because a patch is
    a LoRA file: the stock LoRA loaders and the Model Library list it where users look."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, default)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})
    for path in folder_paths.get_folder_paths(FOLDER):
        folder_paths.add_model_folder_path("loras", path)


class ApplyForgetPatch:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Applies a forget patch to a model (and, for a 'token rows' patch, to its CLIP). Chain several to "
                   "forget several concepts; the inputs are not changed.")
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with the patch applied.",
                       "The CLIP with the patch's text-encoder side applied; the input CLIP itself when the patch has "
                       "none (every mode but 'token rows').")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        low, high = STRENGTH_RANGE
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch."}),
            "patch": ("FORGET_PATCH", {"tooltip": "A patch from Forget Train or Load Forget Patch."}),
            "strength": ("FLOAT", {"default": 1.0, "min": low, "max": high, "step": 0.05,
                                   "tooltip": "1.0 applies the patch as trained; lower values forget less, 0 disables it."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "The model's text encoder: needed by 'token rows' patches, which edit it; "
                                         "passed through unchanged by the others."}),
        }}

    def apply(self, model, patch, strength, clip=None):
        return {"ui": {"fmn_report": [patch_summary(patch.metadata)]},
                "result": apply_patch_with_clip(model, clip, patch, strength)}


class LoadForgetPatch:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = "Loads a forget patch (.safetensors) from the models/forget_patches folder."
    RETURN_TYPES = ("FORGET_PATCH",)
    OUTPUT_TOOLTIPS = ("The loaded patch: connect it to Apply Forget Patch.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"patch_name": (folder_paths.get_filename_list(FOLDER),
                                            {"tooltip": "A patch file in models/forget_patches."})}}

    @classmethod
    def IS_CHANGED(cls, patch_name):
        path = folder_paths.get_full_path_or_raise(FOLDER, patch_name)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def load(self, patch_name):
        patch = load_patch(folder_paths.get_full_path_or_raise(FOLDER, patch_name))
        return {"ui": {"fmn_report": [patch_summary(patch.metadata)]}, "result": (patch,)}


class SaveForgetPatch:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Saves a forget patch into models/forget_patches as a LoRA-format .safetensors file whose header "
                   "says what it forgets (shown in the Model Library, with an optional cover picture).")
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "patch": ("FORGET_PATCH", {"tooltip": "The patch to save."}),
            "filename": ("STRING", {"default": "forget_patch",
                                    "tooltip": "File name inside models/forget_patches (.safetensors is added)."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a file of the same name instead of stopping with an error."}),
        }, "optional": {
            "cover": ("IMAGE", {"tooltip": "A picture for the Model Library card (the first image, shrunk to 256 px, "
                                           "kept in the file's header), e.g. an image sampled after forgetting."}),
        }}

    def save(self, patch, filename, overwrite, cover=None):
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        path = inside(folder, safe_filename(filename, ".safetensors"))
        save_patch(patch if cover is None else with_cover(patch, cover), path, overwrite=overwrite)
        return {"ui": {"text": [path.name]}}


MERGE_SLOTS = 8


class MergeForgetPatches:
    CATEGORY = "Forget-Me-Not"
    DESCRIPTION = ("Fuses several forget patches into one file. Not a plain sum: each layer's update is fitted by least "
                   "squares so that every patch keeps its effect on its own concept's words and ordinary prompts stay "
                   "as they were; patches that share directions share rank, so the file grows less than their sum.")
    RETURN_TYPES = ("FORGET_PATCH",)
    OUTPUT_TOOLTIPS = ("The fused patch: apply it, or save it with Save Forget Patch.",)
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        slot = ("FORGET_PATCH", {"tooltip": "A patch to fuse (from Forget Train or Load Forget Patch)."})
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder of the model the patches were trained on: it encodes "
                                             "each patch's concepts, which the fusion keeps apart."}),
                "patch_1": slot,
                "patch_2": slot,
                "preserve_weight": ("FLOAT", {"default": PRESERVE_WEIGHT, "min": 0.0, "max": 100.0, "step": 0.1,
                                              "tooltip": "How strongly ordinary prompts are held as they were, "
                                                         "against reproducing each patch exactly on its concept."}),
            },
            "optional": {f"patch_{i}": slot for i in range(3, MERGE_SLOTS + 1)},
        }

    def merge(self, clip, patch_1, patch_2, preserve_weight, **more):
        patches = [patch_1, patch_2] + [more[f"patch_{i}"] for i in range(3, MERGE_SLOTS + 1) if more.get(f"patch_{i}")]
        return (merge_patches(clip, patches, preserve_weight),)
