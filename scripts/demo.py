"""`make demo`: forget concepts on the bundled ToyBench model through the real ComfyUI server.

Starts ComfyUI with the pack on loopback, submits the pack's own example workflows in API
form (their checkpoint loader swapped for Load ToyBench, sizes set for the 32 px world):
forget one concept, forget a second one, stack both patches, then the M-Score workflow
(inversion + M-Score before/after a patch, shipped for ToyBench). The ToyBench oracle
says which concepts the generated images show. Writes out/demo/: before/after grids
(PNG), the patch and embedding files, and report.md with the measured numbers.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from comfy_server import WORKFLOWS, running_server  # noqa: E402
from workflow_api import node_ids, nodes_of, set_inputs, ui_to_api, with_advanced_train  # noqa: E402

OUT = REPO / "out" / "demo"
BATCH = 8
SIZE = 32
SAMPLING = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
FORGET = [("Captain Zorb", "identity", "a portrait of Captain Zorb"), ("star", "object", "a star")]
KEPT = [("Madame Plink", "a portrait of Madame Plink"), ("neon", "a ring in the style of neon")]
STARTED = time.monotonic()


def stage(message: str) -> None:
    print(f"[demo {time.monotonic() - STARTED:5.0f}s] {message}", flush=True)


def toy_prompt(workflow: str, object_info: dict) -> dict:
    """An example workflow in API form, on the toy model: the loader swapped, 32 px, no negative words."""
    prompt = ui_to_api(json.loads((WORKFLOWS / workflow).read_text()), object_info)
    for node_id in node_ids(prompt, "CheckpointLoaderSimple"):
        prompt[node_id] = {"class_type": "FMN_LoadToyBench", "inputs": {}}
    set_inputs(prompt, "EmptyLatentImage", width=SIZE, height=SIZE, batch_size=BATCH)
    set_inputs(prompt, "KSampler", **SAMPLING)
    for node in nodes_of(prompt, "CLIPTextEncode"):
        node["inputs"]["text"] = ""
    return prompt


def positive(prompt: dict, text: str) -> None:
    """Set the text of every prompt encoder that feeds a sampler's positive input."""
    for node in nodes_of(prompt, "KSampler"):
        prompt[node["inputs"]["positive"][0]]["inputs"]["text"] = text


def images_of(server, entry: dict, prompt: dict, title_node: str) -> torch.Tensor:
    """The images a SaveImage node wrote, as an IMAGE batch (N, H, W, 3) in [0, 1]."""
    files = entry["outputs"][title_node]["images"]
    arrays = [np.asarray(Image.open(server.output_dir / f["subfolder"] / f["filename"]).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).float() / 255.0


def detection(oracle, images: torch.Tensor, concept: str) -> float:
    from toybench.oracle import detects

    return float(detects(oracle.predict(images), concept).float().mean())


def save_grid(rows: dict[str, torch.Tensor], path: Path) -> None:
    """One row of images per label, upscaled 4x so 32 px samples are visible."""
    strips = [torch.cat(list(images), dim=1) for images in rows.values()]
    grid = (torch.cat(strips, dim=0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def forget_one(server, object_info: dict, concept: str, category: str, text: str) -> dict:
    prompt = with_advanced_train(toy_prompt("forget_concept.json", object_info), object_info)  # to set resolution
    filename = "toy_" + concept.lower().replace(" ", "_")
    set_inputs(prompt, "FMN_ForgetTrain", concepts=f"{concept} | {category}", resolution=SIZE)
    set_inputs(prompt, "FMN_SaveForgetPatch", filename=filename, overwrite=True)
    positive(prompt, text)
    started = time.monotonic()
    entry = server.run_prompt(prompt, timeout_s=600)
    seconds = time.monotonic() - started
    saves = {prompt[i]["inputs"]["filename_prefix"]: i for i in node_ids(prompt, "SaveImage")}
    before = images_of(server, entry, prompt, saves["forget_me_not/before"])
    after = images_of(server, entry, prompt, saves["forget_me_not/after"])
    return {"concept": concept, "file": f"{filename}.safetensors", "seconds": seconds, "before": before, "after": after}


def stacked(server, object_info: dict, patches: list[str], strength: float, text: str) -> torch.Tensor:
    prompt = toy_prompt("stack_patches.json", object_info)
    for node_id, name in zip(node_ids(prompt, "FMN_LoadForgetPatch"), patches):
        prompt[node_id]["inputs"]["patch_name"] = name
    set_inputs(prompt, "FMN_ApplyForgetPatch", strength=strength)
    positive(prompt, text)
    entry = server.run_prompt(prompt, timeout_s=300)
    return images_of(server, entry, prompt, node_ids(prompt, "SaveImage")[0])


def mscore_run(server, object_info: dict, oracle) -> dict:
    """The shipped M-Score workflow as it is: M-Score table, anchors and learned-token samples."""
    prompt = ui_to_api(json.loads((WORKFLOWS / "mscore.json").read_text()), object_info)
    started = time.monotonic()
    entry = server.run_prompt(prompt, timeout_s=900)
    seconds = time.monotonic() - started
    (mscore_id,) = node_ids(prompt, "FMN_MScore")
    saves = {prompt[i]["_meta"]["title"]: i for i in node_ids(prompt, "SaveImage")}
    anchors = images_of(server, entry, prompt, saves["Anchors"])
    learned = images_of(server, entry, prompt, saves["Images from the learned tokens"])
    return {"report": entry["outputs"][mscore_id]["text"][0], "seconds": seconds, "anchors": anchors, "learned": learned,
            "detection": detection(oracle, learned, "Captain Zorb")}


def main() -> int:
    from toybench.loader import load_oracle

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    oracle = load_oracle()
    with tempfile.TemporaryDirectory(prefix="fmn-demo-") as base, running_server(Path(base)) as server:
        stage(f"ComfyUI is up on {server.url} with the pack")
        object_info = server.get("/object_info")
        forgotten = []
        for concept, category, text in FORGET:
            stage(f"forget_concept.json: forgetting {concept!r} on ToyBench")
            run = forget_one(server, object_info, concept, category, text)
            shutil.copy(server.patches_dir / run["file"], OUT / run["file"])
            save_grid({"before": run["before"], "after": run["after"]}, OUT / f"forget_{run['file'][:-12]}.png")
            forgotten.append(run)
        stage("stack_patches.json: both patches on one model, every concept sampled off and on")
        patches = [run["file"] for run in forgotten]
        table = []
        for concept, text in [(c, t) for c, _, t in FORGET] + KEPT:
            off, on = stacked(server, object_info, patches, 0.0, text), stacked(server, object_info, patches, 1.0, text)
            save_grid({"off": off, "on": on}, OUT / f"stacked_{concept.lower().replace(' ', '_')}.png")
            table.append((concept, concept in {c for c, _, _ in FORGET}, detection(oracle, off, concept), detection(oracle, on, concept)))
        stage("mscore.json: M-Score of Captain Zorb before and after a patch; his anchors inverted from 'person'")
        mscore = mscore_run(server, object_info, oracle)
        shutil.copy(server.models_dir / "embeddings" / "toybench_inverted.safetensors", OUT / "toybench_inverted.safetensors")
        save_grid({"anchors": mscore["anchors"], "learned": mscore["learned"]}, OUT / "inversion_captain_zorb.png")
    write_report(forgotten, table, oracle, mscore)
    stage(f"done: {OUT.relative_to(REPO)}/report.md")
    return 0


def write_report(forgotten: list[dict], table: list[tuple], oracle, mscore: dict) -> None:
    lines = ["# Forget-Me-Not demo on ToyBench", "",
             f"Real ComfyUI server, the pack's example workflows, {BATCH} samples per prompt "
             f"({SIZE} px, {SAMPLING['sampler_name']} {SAMPLING['steps']} steps, CFG {SAMPLING['cfg']}). "
             "Detection = share of samples in which the ToyBench oracle finds the concept.", "",
             "## forget_concept.json", "", "| concept | detection before | after | seconds (whole workflow) | patch |",
             "|---|---|---|---|---|"]
    for run in forgotten:
        lines.append(f"| {run['concept']} | {detection(oracle, run['before'], run['concept']):.2f} | "
                     f"{detection(oracle, run['after'], run['concept']):.2f} | {run['seconds']:.1f} | "
                     f"{run['file']} ({(OUT / run['file']).stat().st_size:,} bytes) |")
    lines += ["", "## stack_patches.json (both patches, strength 0 vs 1)", "",
              "| concept | forgotten? | detection without patches | with both |", "|---|---|---|---|"]
    lines += [f"| {c} | {'yes' if f else 'kept'} | {b:.2f} | {a:.2f} |" for c, f, b, a in table]
    lines += ["", f"## mscore.json ({mscore['seconds']:.1f} s)", "", mscore["report"], "",
              f"Samples of *a portrait of embedding:toybench_inverted* (learned from the anchors, starting from the "
              f"word *person*): Captain Zorb detected in {mscore['detection']:.2f}.", "",
              "Grids: `forget_*.png` (top row before, bottom after), `stacked_*.png` (top off, bottom on), "
              "`inversion_captain_zorb.png` (top the anchors, bottom the learned tokens' samples)."]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
