"""Cancel during Forget Train on the real server, as the frontend's Cancel does it: the
prompt ends within one training step of the interrupt and no patch file is written.

The test listens to the server's websocket like the frontend does: the node's progress
messages say which step the run had reached when the interrupt was sent and which step it
stopped at. Steps are made slow (a large batch) so that a step lasts far longer than a
websocket message takes to arrive.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
import pytest

from comfy_server import ComfyServer, running_server
from toy_prompts import add_training, toy

pytestmark = pytest.mark.server

STEPS = 500           # far more than run before the interrupt
BATCH = 16            # ~0.5-1 s per step on 2 CPU cores
INTERRUPT_AT = 3      # steps seen done before Cancel
TIMEOUT_S = 600.0
PATCH_NAME = "cancelled"
HISTORY_WAIT_S = 30.0


def training_prompt() -> dict:
    prompt: dict = {}
    toy(prompt)
    add_training(prompt, "train", PATCH_NAME, STEPS, batch_size=BATCH)
    return prompt


async def cancel_mid_run(url: str) -> tuple[int, int, list[str]]:
    """Queue the training, interrupt it after INTERRUPT_AT steps; (last step seen before the
    interrupt was sent, last step reported at all, the prompt's closing message types)."""
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        async with session.post(f"{url}/prompt", json={"prompt": training_prompt(), "client_id": client_id}) as r:
            prompt_id = (await r.json())["prompt_id"]
        seen, at_interrupt, endings = 0, None, []
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(message.data)
            data = event.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            if event["type"] == "progress" and data.get("node") == "train":
                seen = data["value"]
                if at_interrupt is None and seen >= INTERRUPT_AT:
                    at_interrupt = seen
                    async with session.post(f"{url}/interrupt", json={"prompt_id": prompt_id}) as r:
                        r.raise_for_status()
            elif event["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                endings.append(event["type"])
                break
        return at_interrupt, seen, endings


def recorded_history(server: ComfyServer) -> list[dict]:
    """The history once the server has stored the ended prompt (it may announce the end over
    the websocket a moment before)."""
    deadline = time.monotonic() + HISTORY_WAIT_S
    while not (history := list(server.get("/history").values())) and time.monotonic() < deadline:
        time.sleep(0.2)
    return history


def test_cancel_ends_forget_train_within_one_step_and_writes_nothing(tmp_path) -> None:
    with running_server(tmp_path / "comfyui") as server:
        at_interrupt, last, endings = asyncio.run(asyncio.wait_for(cancel_mid_run(server.url), TIMEOUT_S))
        history = recorded_history(server)
        log = server.log_text()
        patches = sorted(p.name for p in server.patches_dir.glob("*")) if server.patches_dir.exists() else []
    assert endings == ["execution_interrupted"], (endings, log[-3000:])
    assert at_interrupt is not None and at_interrupt >= INTERRUPT_AT
    assert last - at_interrupt <= 1, f"interrupted at step {at_interrupt}, still ran to step {last}"
    assert len(history) == 1 and history[0]["status"]["status_str"] == "error"
    assert patches == [], patches
