"""The save-every-N and resume inputs both training nodes share, over a host model folder."""
from __future__ import annotations

from pathlib import Path

import folder_paths

from ..fmn_core.checkpoint import Checkpoints, state_path
from ..fmn_core.files import inside, safe_filename

NO_RESUME = "none"
RESUME_TOOLTIP = ("Continue a run from one of its checkpoints (same inputs and settings; only steps may grow): it ends "
                  "with exactly the result the uninterrupted run gives. Lists only files saved with their training state.")


def save_every_input(what: str, folder: str) -> tuple:
    return ("INT", {"default": 0, "min": 0, "max": 10000,
                    "tooltip": f"Every N steps, write the {what} so far to models/{folder}/<name>_step<N>.safetensors with "
                               "its training state beside it (.fmn-state), so a cancelled or crashed run can resume. 0: off."})


def resume_input(folder: str) -> tuple:
    return ([NO_RESUME, *resumable(folder)], {"default": NO_RESUME, "tooltip": RESUME_TOOLTIP})


def resumable(folder: str) -> list[str]:
    """Files in a model folder that have a training state beside them (a file removed since
    the host listed the folder is skipped, not an error)."""
    paths = {name: folder_paths.get_full_path(folder, name) for name in folder_paths.get_filename_list(folder)}
    return [name for name, path in paths.items() if path and state_path(path).is_file()]


def checkpoints(folder: str, every: int, name: str) -> Checkpoints | None:
    if not every:
        return None
    first = folder_paths.get_folder_paths(folder)[0]
    return Checkpoints(every, lambda step: inside(first, safe_filename(f"{name}_step{step}", ".safetensors")))


def resume_path(folder: str, name: str) -> Path | None:
    return None if name == NO_RESUME else state_path(folder_paths.get_full_path_or_raise(folder, name))
