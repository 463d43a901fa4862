"""API prompt pieces on ToyBench for the server tests (busy queue, cancel)."""
from __future__ import annotations


def toy(prompt: dict) -> list:
    """A Load ToyBench node; its MODEL, CLIP and VAE outputs."""
    prompt["toy"] = {"class_type": "FMN_LoadToyBench", "inputs": {}}
    return ["toy", 0], ["toy", 1], ["toy", 2]


def add_training(prompt: dict, node: str, filename: str, steps: int, concepts: str = "star | object", seed: int = 0,
                 **inputs) -> None:
    """A Forget Train node on the prompt's ToyBench (plus any other of its `inputs`) and a
    Save Forget Patch of its patch."""
    prompt[node] = {"class_type": "FMN_ForgetTrain", "inputs": {
        "model": ["toy", 0], "clip": ["toy", 1], "concepts": concepts, "steps": steps, "learning_rate": 0.1, "rank": 4,
        "seed": seed, "resolution": 32, **inputs}}
    prompt[f"save_{node}"] = {"class_type": "FMN_SaveForgetPatch", "inputs": {"patch": [node, 1], "filename": filename,
                                                                              "overwrite": False}}
