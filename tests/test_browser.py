"""The Attention Map Viewer's frontend extension (web/attention_maps.js) in a real headless
Chromium against the real ComfyUI server: the shipped attention_maps workflow is loaded into
the graph and queued from the page as a user does (with fewer steps, for CPU time),
and the grid the extension draws on the node is checked against the node's UI message in the
server's history.

Needs Debian's chromium and chromium-driver (scripts/setup_host.sh installs them). The network is
closed, so the browser runs with everything that phones home switched off.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from comfy_server import ARTIFACTS, PACK_DIR_NAME, PATCH_FOLDER, WORKFLOWS, ComfyServer, running_server
from fmn_pack.nodes import NODE_DISPLAY_NAME_MAPPINGS

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = WORKFLOWS / "attention_maps.json"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1400")  # tall enough for the viewer's grid and Forget Train (Advanced)
VIEWER = "FMN_AttentionMapViewer"
WORDS = ["star", "style", "neon"]  # the content words of the workflow's "a star in the style of neon"
MODELS = ["before", "after"]
PAGE_TIMEOUT_S = 120.0
# The shipped workflow trains 100 steps, then the viewer samples 20 steps per model: 5 to 15
# minutes on 2 busy CPU cores. The grid is the same with fewer steps of each.
FEWER_STEPS = {"FMN_ForgetTrain": 10, VIEWER: 4}
RUN_TIMEOUT_S = 600.0
IMAGE_TIMEOUT_S = 30.0
POLL_S = 1.0
# What the stock front end logs on every start-up here, with or without this pack (checked
# with the pack's extension blocked). 1.32.9: failed loads of the favicon ComfyUI does not
# serve, of optional files a fresh user does not have (user.css, saved workflows, templates),
# and of the registry at api.comfy.org, which a closed network cannot reach; and a TypeError
# from its graph view storing a render-mode setting before the setting is registered.
# 1.47.12 adds failed loads of the model links in its default workflow (huggingface.co, which
# it checks for missing models) and three messages of its own bundles (/assets/): the legacy
# queue and history lists it still builds warn that they are deprecated, its mask editor
# extension warns that the ComfyApp.open_maskeditor it installs is deprecated, and something
# reads app.rootGraph before the graph is set up.
# The help panel asks for a translated page (docs/<node id>/<locale>.md) before the plain
# docs/<node id>.md this pack ships, so each page opened adds one such 404.
EXPECTED_FAILED_LOAD = re.compile(r"^(https://api\.comfy\.org/|https://huggingface\.co/Comfy-Org/"
                                  r"|http://127\.0\.0\.1:\d+/(favicon\.ico|user\.css|api/userdata[/?]"
                                  rf"|extensions/{PACK_DIR_NAME}/docs/FMN_\w+/en\.md))"
                                  r"\S* - Failed to load resource")
STOCK_SETTING_RACE = "TypeError: Cannot read properties of undefined (reading 'id')\n    at onChange ("
STOCK_BUNDLE_MESSAGE = re.compile(r'^http://127\.0\.0\.1:\d+/assets/[\w-]+\.js \d+:\d+ '
                                  r'"(\[ComfyUI\] The legacy queue/history menu is deprecated\. '
                                  r'|\[MaskEditor\] ComfyApp\.open_maskeditor is deprecated\. '
                                  r'|ComfyApp graph accessed before initialization")')

# Started: the graph exists, the viewer node is registered, and the front end's own start-up
# has finished opening a workflow (the default one, or on a reload the tabs it restores): its
# spinner is off and a workflow is active. 1.47.12 restores the open tabs after the graph
# exists and only then turns the spinner off, so a workflow loaded as soon as the graph exists
# is replaced by the restored one.
STARTED_JS = """const app = window.comfyAPI?.app?.app, workspace = app?.extensionManager;
return !!(app?.graph && window.LiteGraph?.registered_node_types?.[arguments[0]]
          && workspace && !workspace.spinner && workspace.workflow?.activeWorkflow)"""
CELLS_JS = """return [...document.querySelectorAll('.fmn-attention-cell')].map(cell => ({
  word: cell.dataset.word, model: cell.dataset.model,
  caption: cell.querySelector('.fmn-attention-word').textContent,
  src: cell.querySelector('img').src}))"""
SET_WIDGET_JS = """const [type, name, value] = arguments;
const node = window.comfyAPI.app.app.graph.nodes.find(n => n.type === type);
node.widgets.find(w => w.name === name).value = value;"""
NODE_RECT_JS = """const app = window.comfyAPI.app.app, ds = app.canvas.ds;
const node = app.graph.nodes.find(n => n.type === arguments[0]);
const box = app.canvas.canvas.getBoundingClientRect(), title = window.LiteGraph.NODE_TITLE_HEIGHT;
return [box.left + (node.pos[0] + ds.offset[0]) * ds.scale, box.top + (node.pos[1] - title + ds.offset[1]) * ds.scale,
        node.size[0] * ds.scale, (node.size[1] + title) * ds.scale, window.devicePixelRatio];"""
IMAGES_LOADED_JS = """const images = [...document.querySelectorAll('.fmn-attention-grid img')];
return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0)"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ComfyServer:
    with running_server(tmp_path_factory.mktemp("comfyui")) as running:
        # A fresh user is greeted by the templates dialog, which would cover the canvas.
        requests.post(f"{running.url}/api/settings/Comfy.TutorialCompleted", json=True, timeout=30).raise_for_status()
        # The minimap and the render statistics would sit in every picture the tests take, and
        # a whole workflow fitted into a thumbnail would be drawn as empty boxes (the level of
        # detail that drops text below a font size; 0 turns it off).
        for setting, value in (("Comfy.Minimap.Visible", False), ("Comfy.Graph.CanvasInfo", False),
                               ("LiteGraph.Canvas.MinFontSizeForLOD", 0)):
            requests.post(f"{running.url}/api/settings/{setting}", json=value, timeout=30).raise_for_status()
        add_model_stand_ins(running)
        yield running


# Model files the shipped workflows pick in a loader, by the folder each loader lists.
MODEL_LOADERS = {"CheckpointLoaderSimple": "checkpoints", "FMN_LoadForgetPatch": PATCH_FOLDER}


def add_model_stand_ins(server: ComfyServer) -> None:
    """Empty files named as the models the shipped workflows pick (a checkpoint, two patches):
    a user who opens them has those files, and without them the 1.47.12 front end outlines each
    such loader in red and raises an error toast over the pictures the tests take. These
    workflows are only opened here, never run."""
    for path in WORKFLOWS.glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in MODEL_LOADERS:
                (server.models_dir / MODEL_LOADERS[node["type"]] / node["widgets_values"][0]).touch()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> WebDriver:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run the set-up, `bash scripts/setup_host.sh` (`make test` "
                    "runs it), which installs Debian's chromium and chromium-driver")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def frontend(server: ComfyServer, browser: WebDriver) -> WebDriver:
    """The front end open in the browser, once it knows the viewer node."""
    open_frontend(browser, server.url)
    return browser


def open_frontend(browser: WebDriver, url: str) -> None:
    """Open (or reload) the page and wait until the front end has started: it knows the viewer
    node and has opened its first workflow (see STARTED_JS)."""
    browser.get(url)
    WebDriverWait(browser, PAGE_TIMEOUT_S, POLL_S / 4).until(
        lambda d: d.execute_script(STARTED_JS, VIEWER),
        f"the front end did not start (or register {VIEWER}) within {PAGE_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="module")
def ui_message(server: ComfyServer, frontend: WebDriver) -> list[dict]:
    """Load the shipped workflow, lower its step counts, queue it from the page and wait for
    the grid on the node; the viewer's `fmn_attention` UI message as the server's history
    recorded it."""
    workflow = json.loads(WORKFLOW.read_text())
    frontend.execute_script("return window.comfyAPI.app.app.loadGraphData(arguments[0])", workflow)
    for node_type, steps in FEWER_STEPS.items():
        frontend.execute_script(SET_WIDGET_JS, node_type, "steps", steps)
    frontend.execute_script("return window.comfyAPI.app.app.queuePrompt(0)")
    entry = wait_for_grid(server, frontend)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    frontend.save_screenshot(str(ARTIFACTS / "attention_maps.png"))
    save_node_picture(frontend, ARTIFACTS / "attention_maps.png", ARTIFACTS / "attention_map_viewer_node.png")
    (viewer_id,) = [str(node["id"]) for node in workflow["nodes"] if node["type"] == VIEWER]
    return entry["outputs"][viewer_id]["fmn_attention"]


def save_node_picture(browser: WebDriver, screenshot: Path, out: Path, node_type: str = VIEWER, whole: bool = True) -> None:
    """One node alone, cut from the screenshot: docs/nodes.md's picture of the viewer
    (docs/attention_map_viewer.png is a copy) and the help pages' pictures, which must show
    the whole node (`whole`)."""
    from PIL import Image
    left, top, width, height, ratio = browser.execute_script(NODE_RECT_JS, node_type)
    with Image.open(screenshot) as image:
        box = [round(v * ratio) for v in (left - 4, top - 4, left + width + 4, top + height + 4)]
        assert not whole or (box[2] <= image.width and box[3] <= image.height), \
            f"{node_type} runs off the page: {box}, {image.size}"
        image.crop((max(box[0], 0), max(box[1], 0), min(box[2], image.width), min(box[3], image.height))).save(out)


def wait_for_grid(server: ComfyServer, browser: WebDriver) -> dict:
    """The finished history entry, once the grid is drawn; fail at once if the run failed."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        entry = finished_entry(server)
        if entry is not None and browser.find_elements(By.CSS_SELECTOR, ".fmn-attention-grid"):
            return entry
        time.sleep(POLL_S)
    pytest.fail(f"no attention grid on the node within {RUN_TIMEOUT_S:.0f} s\n"
                f"--- server log tail ---\n{server.log_text()[-4000:]}")


def finished_entry(server: ComfyServer) -> dict | None:
    """The prompt's history entry once it has finished; None while it runs (a server busy
    sampling on a loaded CPU may take longer than a request's timeout to answer)."""
    if server.process.poll() is not None:
        pytest.fail(f"the server exited with {server.process.returncode}\n{server.log_text()[-4000:]}")
    try:
        history = list(server.get("/history").values())
    except TimeoutError:
        return None
    assert len(history) <= 1, "this module queues one prompt"
    if not history or history[0]["status"].get("completed") is None:
        return None
    status = history[0]["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[-4000:]
    return history[0]


def shown_cells(browser: WebDriver) -> list[dict]:
    return browser.execute_script(CELLS_JS)


def served_file(src: str) -> dict:
    """The file reference a /api/view URL asks for."""
    query = parse_qs(urlparse(src).query)
    return {key: query.get(key, [""])[0] for key in ("filename", "subfolder", "type")}


def wait_for_images(browser: WebDriver) -> None:
    WebDriverWait(browser, IMAGE_TIMEOUT_S, POLL_S / 4).until(
        lambda d: d.execute_script(IMAGES_LOADED_JS), f"map images not all loaded within {IMAGE_TIMEOUT_S:.0f} s")


def test_extension_is_served(server: ComfyServer) -> None:
    assert f"/extensions/{PACK_DIR_NAME}/attention_maps.js" in server.get("/extensions")


def test_grid_shows_one_map_per_word_and_model_as_the_node_reported(browser: WebDriver, ui_message: list[dict]) -> None:
    assert [(m["model"], m["word"]) for m in ui_message] == [(model, word) for model in MODELS for word in WORDS]
    cells = shown_cells(browser)
    assert [(c["model"], c["word"]) for c in cells] == [(m["model"], m["word"]) for m in ui_message]
    assert [c["caption"] for c in cells] == [c["word"] for c in cells]
    assert [served_file(c["src"]) for c in cells] == [
        {"filename": m["filename"], "subfolder": m["subfolder"], "type": m["type"]} for m in ui_message]


def test_every_map_image_loads(browser: WebDriver, ui_message: list[dict]) -> None:
    wait_for_images(browser)


def test_before_and_after_each_have_a_headed_column(browser: WebDriver, ui_message: list[dict]) -> None:
    columns = browser.find_elements(By.CSS_SELECTOR, ".fmn-attention-grid .fmn-attention-column")
    assert [c.get_attribute("data-model") for c in columns] == MODELS
    assert [c.find_element(By.CSS_SELECTOR, ".fmn-attention-heading").text.lower() for c in columns] == MODELS
    for column, model in zip(columns, MODELS):
        words = [cell.get_attribute("data-word") for cell in column.find_elements(By.CSS_SELECTOR, ".fmn-attention-cell")]
        assert words == WORDS, model


def test_clicking_a_map_enlarges_it_until_clicked_or_escaped(browser: WebDriver, ui_message: list[dict]) -> None:
    wait_for_images(browser)
    cell = browser.find_element(By.CSS_SELECTOR, '.fmn-attention-cell[data-word="star"][data-model="after"]')
    cell.click()
    zoom = browser.find_element(By.CSS_SELECTOR, ".fmn-attention-zoom")
    assert (zoom.get_attribute("data-word"), zoom.get_attribute("data-model")) == ("star", "after")
    WebDriverWait(browser, IMAGE_TIMEOUT_S, POLL_S / 4).until(
        lambda d: d.execute_script("return document.querySelector('.fmn-attention-zoom img').naturalWidth > 0"))
    large, small = (e.find_element(By.TAG_NAME, "img").size["width"] for e in (zoom, cell))
    assert large > 2 * small, (large, small)
    browser.save_screenshot(str(ARTIFACTS / "attention_maps_zoom.png"))
    zoom.click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".fmn-attention-zoom")

    cell.click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not browser.find_elements(By.CSS_SELECTOR, ".fmn-attention-zoom")


def unexpected(entry: dict) -> bool:
    """An error or warning that is not the stock front end's start-up noise (see above)."""
    if entry["level"] not in ("SEVERE", "WARNING"):
        return False
    message = entry["message"]
    if entry["source"] == "network" and EXPECTED_FAILED_LOAD.match(message):
        return False
    if entry["source"] != "console-api":
        return True
    return not ((STOCK_SETTING_RACE in message and "/extensions/" not in message) or STOCK_BUNDLE_MESSAGE.match(message))


VERDICT_JS = "return [...document.querySelectorAll('.fmn-verdict-text')].map(e => e.textContent)"


def test_forget_train_shows_its_verdict_on_the_node(server: ComfyServer, frontend: WebDriver, ui_message: list[dict]) -> None:
    """The workflow's Forget Train ran before the viewer: its node shows the one-line verdict
    the server's history recorded for it (web/forget_report.js)."""
    (entry,) = server.get("/history").values()
    workflow = json.loads(WORKFLOW.read_text())
    (train_id,) = [str(node["id"]) for node in workflow["nodes"] if node["type"] == "FMN_ForgetTrain"]
    [report] = entry["outputs"][train_id]["fmn_report"]
    WebDriverWait(frontend, IMAGE_TIMEOUT_S, POLL_S / 4).until(lambda d: d.execute_script(VERDICT_JS),
                                                               "no verdict on the Forget Train node")
    assert frontend.execute_script(VERDICT_JS) == [report["verdict"]]
    assert report["verdict"].startswith("erased ")
    screenshot = ARTIFACTS / "forget_train_verdict_screen.png"
    frontend.save_screenshot(str(screenshot))
    # the node's top, with the verdict: its report image below makes it taller than any window
    save_node_picture(frontend, screenshot, ARTIFACTS / "forget_train_verdict.png", "FMN_ForgetTrain", whole=False)


def test_console_has_no_errors_or_warnings(browser: WebDriver, ui_message: list[dict]) -> None:
    """Everything logged since the page opened: start-up, the extension loading, the run,
    the grid and (when the tests above ran) the zoom."""
    assert not [e for e in browser.get_log("browser") if unexpected(e)]


# --- each node on the canvas, and its help page from the node library ----------------------

DOCS = REPO / "web" / "docs"
PACK_NODES_JS = """return Object.keys(window.LiteGraph.registered_node_types).filter(t => t.startsWith('FMN_')).sort()
  .map(t => [t, window.LiteGraph.registered_node_types[t].title])"""
# The nodes already on the canvas are removed one by one rather than by graph.clear(): 1.47's
# clear() gives the graph the all-zero id and, once it has that id, no longer forgets the
# widget values it keeps per graph id, node id and widget name, so a new node 1 would show
# the values of the last node 1 wherever the widget names match (steps, learning_rate, ...).
# Removed nodes leave their ids used, so every node created here gets a new one.
ONE_NODE_JS = """const app = window.comfyAPI.app.app;
for (const old of [...app.graph.nodes]) app.graph.remove(old);
const node = window.LiteGraph.createNode(arguments[0]);
app.graph.add(node);
node.pos = [420, 240];  // clear of the sidebar, tabs and menus that float over the canvas
app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1;
app.canvas.setDirty(true, true);  // drawn by the render loop, which also places the text boxes
return node.size;"""
# The widgets drawn as page elements over the canvas (the text boxes of concepts, keep, ...)
# are placed by the canvas's render loop after the node is added (1.47.12 first puts them at
# the page's top left, full width): the picture waits until each is shown inside the node.
DOM_WIDGETS_JS = """const node = window.comfyAPI.app.app.graph.nodes.find(n => n.type === arguments[0]);
return (node.widgets ?? []).filter(w => w.element).map(w => {
  const box = w.element.getBoundingClientRect(), style = getComputedStyle(w.element);
  const blank = !['TEXTAREA', 'INPUT'].includes(w.element.tagName) && !w.element.innerText.trim()
                && !w.element.querySelector('img, canvas, textarea, input');
  return {name: w.name, blank, connected: w.element.isConnected, width: box.width, height: box.height,
          display: style.display, visibility: style.visibility, opacity: style.opacity, x: box.x, y: box.y};
})"""


def dom_widgets_shown(browser: WebDriver, node_id: str) -> bool:
    """Every page-element widget of the node that shows something (the verdict line before a
    run shows nothing) is shown inside the node."""
    left, top, width, height, _ = browser.execute_script(NODE_RECT_JS, node_id)
    return all(w["blank"] or (w["connected"] and w["display"] != "none" and w["visibility"] != "hidden"
                              and w["opacity"] != "0" and left - 2 <= w["x"] and w["x"] + w["width"] <= left + width + 2
                              and top <= w["y"] and w["y"] + w["height"] <= top + height + 2)
               for w in browser.execute_script(DOM_WIDGETS_JS, node_id))
WIDGET_VALUES_JS = """const node = window.comfyAPI.app.app.graph.nodes.find(n => n.type === arguments[0]);
return Object.fromEntries((node.widgets ?? []).map(w => [w.name, w.value]))"""
HELP_JS = """const help = document.querySelector('.node-help-content');
if (!help) return null;
const images = [...help.querySelectorAll('img')];
return {title: help.querySelector('h1')?.textContent ?? '',
        headings: [...help.querySelectorAll('h2')].map(h => h.textContent),
        rows: help.querySelectorAll('table tr').length,
        images: images.map(i => i.getAttribute('src')),
        loaded: images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0)}"""
# Where the help page shows differs between front ends, and so does what closes it: the
# properties panel's own toggle (1.47.12), or the Info button again, which closes the page and
# the node library panel it opened (1.32.9).
CLOSE_HELP_JS = """const panel = document.querySelector('.node-help-content')?.closest("[data-testid='properties-panel']");
const button = panel ? panel.querySelector("button[aria-label='Toggle properties panel']")
                     : document.querySelector("[data-testid='info-button']");
button?.click();
return !!button"""
HELP_PANEL_OPEN_JS = """return !!document.querySelector(".node-help-content, [data-testid='properties-panel'], .node-lib-node-container")"""


@pytest.fixture(scope="module")
def pack_nodes(frontend: WebDriver) -> dict[str, str]:
    """Node id -> display name, as the front end registered them."""
    return dict(frontend.execute_script(PACK_NODES_JS))


def defaults(node_info: dict) -> dict:
    """The inputs the node declares a default for, with that default."""
    return {name: spec[1]["default"] for section in ("required", "optional")
            for name, spec in node_info["input"].get(section, {}).items()
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def test_each_node_draws_on_an_empty_canvas(server: ComfyServer, frontend: WebDriver, pack_nodes: dict[str, str]) -> None:
    """Every node drawn alone with its defaults, cut from a screenshot: the help pages'
    pictures (web/docs/<node id>.png are copies of out/test-artifacts/nodes/<node id>.png)."""
    assert pack_nodes == NODE_DISPLAY_NAME_MAPPINGS, pack_nodes
    folder = ARTIFACTS / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    draw_each_node(server, frontend, pack_nodes, folder)


def draw_each_node(server: ComfyServer, frontend: WebDriver, pack_nodes: dict[str, str], folder: Path) -> None:
    from PIL import Image
    for node_id in pack_nodes:
        width, height = frontend.execute_script(ONE_NODE_JS, node_id)
        assert width > 100 and height > 20, (node_id, width, height)
        try:
            WebDriverWait(frontend, IMAGE_TIMEOUT_S).until(lambda d: dom_widgets_shown(d, node_id))
        except TimeoutException:
            pytest.fail(f"{node_id}: its text boxes never showed on the node "
                        f"{frontend.execute_script(NODE_RECT_JS, node_id)}: {frontend.execute_script(DOM_WIDGETS_JS, node_id)}")
        values = frontend.execute_script(WIDGET_VALUES_JS, node_id)
        expected = {name: value for name, value in defaults(server.get(f"/object_info/{node_id}")[node_id]).items()
                    if name in values}
        assert {name: values[name] for name in expected} == pytest.approx(expected), node_id
        shot = folder / f"{node_id}-screen.png"
        frontend.save_screenshot(str(shot))
        save_node_picture(frontend, shot, folder / f"{node_id}.png", node_id)
        shot.unlink()
        with Image.open(folder / f"{node_id}.png") as picture:
            assert len(set(picture.convert("L").getdata())) > 8, f"{node_id}: the node drew as a flat picture"


def open_help(browser: WebDriver, node_id: str, display_name: str) -> dict:
    """Open a node's help page as a user does: the node alone on the canvas, a click on its
    title selects it, and the Info button of the toolbox over the selection shows the page
    (1.32.9: in the node library panel, whose library also has a "?" per node; 1.47.12: in the
    properties panel's Info tab, and its redesigned library has none); what the page shows once
    its pictures have loaded."""
    browser.execute_script(ONE_NODE_JS, node_id)
    left, top, width, _, _ = browser.execute_script(NODE_RECT_JS, node_id)
    title = browser.execute_script("return window.LiteGraph.NODE_TITLE_HEIGHT")
    actions = ActionBuilder(browser)
    actions.pointer_action.move_to_location(round(left + width / 2), round(top + title / 2)).click()
    actions.perform()
    (info,) = WebDriverWait(browser, IMAGE_TIMEOUT_S, POLL_S / 4).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='info-button']"),
        f"no Info button over the selected {node_id}")
    info.click()
    return WebDriverWait(browser, IMAGE_TIMEOUT_S, POLL_S / 4).until(
        lambda d: (page := d.execute_script(HELP_JS)) and page["title"] == display_name and page["loaded"] and page,
        f"the help page of {display_name} did not show with its pictures within {IMAGE_TIMEOUT_S:.0f} s")


def close_help(browser: WebDriver) -> None:
    """Close the help page and the panel it opened in, so that nothing covers the canvas."""
    assert browser.execute_script(CLOSE_HELP_JS), "no button closes the help page"
    WebDriverWait(browser, IMAGE_TIMEOUT_S, POLL_S / 4).until(
        lambda d: not d.execute_script(HELP_PANEL_OPEN_JS), "the help page did not close")


def test_every_help_page_opens_from_the_node_info_button(frontend: WebDriver, pack_nodes: dict[str, str]) -> None:
    for node_id, display_name in pack_nodes.items():
        page = open_help(frontend, node_id, display_name)
        assert page["headings"][:2] == ["Inputs", "Outputs"], (node_id, page["headings"])
        assert page["rows"] >= 2, f"{node_id}: the help page shows no Outputs table"
        assert [src.rsplit("/", 1)[-1] for src in page["images"]] == [f"{node_id}.png"], page["images"]
        if node_id == "FMN_ForgetTrain":
            frontend.save_screenshot(str(ARTIFACTS / "help_page.png"))
        close_help(frontend)
    assert not [e for e in frontend.get_log("browser") if unexpected(e)]


# --- workflow thumbnails for the templates browser -----------------------------------------

SHOW_WORKFLOW_JS = """const app = window.comfyAPI.app.app, [left, top] = arguments[1];
await app.loadGraphData(arguments[0]);
const title = window.LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph.nodes;
const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
const box = app.canvas.canvas.getBoundingClientRect(), room = [box.width - left - 20, box.height - top - 20];
const ds = app.canvas.ds;
ds.scale = Math.min(room[0] / (x1 - x0), room[1] / (y1 - y0), 1);
ds.offset = [(left + 10) / ds.scale - x0, (top + 10) / ds.scale - y0];
app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);
return [nodes.map(n => n.type), [box.left, box.top, box.width, box.height, window.devicePixelRatio]];"""
THUMBNAIL_WIDTH = 640
# Screen strips the front end draws over the canvas: the tab and menu bars, the side bar.
OVERLAYS_TOP, OVERLAYS_LEFT = 130, 60


def test_each_workflow_opens_and_is_pictured_for_the_templates_browser(frontend: WebDriver) -> None:
    """Every shipped workflow opens in the real front end with all its nodes known; its
    screenshot, fitted to view, is the templates browser's thumbnail (workflows/<name>.jpg
    are copies of out/test-artifacts/workflows/<name>.jpg)."""
    from PIL import Image
    folder = ARTIFACTS / "workflows"
    folder.mkdir(parents=True, exist_ok=True)
    known = set(frontend.execute_script("return Object.keys(window.LiteGraph.registered_node_types)"))
    for path in sorted(WORKFLOWS.glob("*.json")):
        workflow = json.loads(path.read_text())
        types, (left, top, width, height, ratio) = frontend.execute_script(SHOW_WORKFLOW_JS, workflow, [OVERLAYS_LEFT, OVERLAYS_TOP])
        assert sorted(types) == sorted(n["type"] for n in workflow["nodes"]), path.name
        assert set(types) <= known, f"{path.name}: unknown node types {set(types) - known}"
        shot = folder / f"{path.stem}-screen.png"
        frontend.save_screenshot(str(shot))
        with Image.open(shot) as screen:
            box = [round(v * ratio) for v in (left + OVERLAYS_LEFT, top + OVERLAYS_TOP, left + width, top + height)]
            picture = screen.convert("RGB").crop(box)
        shot.unlink()
        picture.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
        picture.save(folder / f"{path.stem}.jpg", quality=85)
        assert len(set(picture.convert("L").getdata())) > 16, f"{path.name}: the graph drew as a flat picture"
    assert not [e for e in frontend.get_log("browser") if unexpected(e)]


# The templates dialog: PrimeVue's .p-dialog in 1.32.9, a reka-ui dialog in 1.47.12;
# both are role="dialog".
DIALOG = "[role='dialog']"
CLICK_PACK_ENTRY_JS = """const entry = [...document.querySelectorAll("DIALOG span")]
  .find(e => e.textContent.trim() === arguments[0]);
if (entry) entry.click();
return !!entry""".replace("DIALOG", DIALOG)
CLICK_CARD_JS = """const card = document.querySelector(`DIALOG [data-testid='template-workflow-${arguments[0]}']`);
if (card) card.click();
return !!card""".replace("DIALOG", DIALOG)
CARD_NAMES_JS = """return [...document.querySelectorAll("DIALOG [data-testid^='template-workflow-']")]
.map(card => card.dataset.testid.slice('template-workflow-'.length))""".replace("DIALOG", DIALOG)
# One card's own thumbnail: loaded or not. The dialog draws a card's image only while the card
# is in view and drops it once the card scrolls out (nine cards overflow the dialog), so the
# card is scrolled into view first. A thumbnail that fails to load is replaced by the front
# end's default picture, which is not the card's own (that one is drawn from a blob: URL).
THUMBNAIL_JS = """const card = document.querySelector(`DIALOG [data-testid='template-workflow-${arguments[0]}']`);
if (!card) return false;
card.scrollIntoView({block: "center"});
return [...card.querySelectorAll("img")].some(img => !img.src.includes("default-template")
  && img.complete && img.naturalWidth > 0)""".replace("DIALOG", DIALOG)


def open_pack_templates(browser: WebDriver) -> None:
    """Browse Templates (the workflow menu's command), then the pack's entry under Extensions
    (found and clicked in one script: the dialog re-renders while it loads)."""
    browser.execute_script("return window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    WebDriverWait(browser, PAGE_TIMEOUT_S, POLL_S / 4).until(
        lambda d: d.execute_script(CLICK_PACK_ENTRY_JS, PACK_DIR_NAME), f"the templates dialog shows no {PACK_DIR_NAME} entry")


def test_each_workflow_opens_from_the_templates_dialog(frontend: WebDriver) -> None:
    """The templates dialog of the real front end lists every shipped workflow under the
    pack's name with its thumbnail, and clicking a card loads that workflow's nodes."""
    names = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
    for name in names:
        open_pack_templates(frontend)
        WebDriverWait(frontend, PAGE_TIMEOUT_S, POLL_S / 4).until(
            lambda d: sorted(d.execute_script(CARD_NAMES_JS)) == names,
            "the pack's templates are not listed one card per shipped workflow")
        WebDriverWait(frontend, IMAGE_TIMEOUT_S, POLL_S / 4).until(
            lambda d: d.execute_script(THUMBNAIL_JS, name), f"{name}: its template card shows no loaded thumbnail")
        assert frontend.execute_script(CLICK_CARD_JS, name), f"no template card for {name}"
        expected = sorted(n["type"] for n in json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"])
        WebDriverWait(frontend, PAGE_TIMEOUT_S, POLL_S / 4).until(
            lambda d: sorted(d.execute_script("return window.comfyAPI.app.app.graph.nodes.map(n => n.type)")) == expected
            and not d.find_elements(By.CSS_SELECTOR, DIALOG),
            f"{name}: clicking its template card did not load its nodes")
    assert not [e for e in frontend.get_log("browser") if unexpected(e)]


# --- the newer Vue node renderer ("Nodes 2.0") -------------------------------------------------

VUE_NODES = "Comfy.VueNodes.Enabled"
GRID_IN_VUE_NODE_JS = """const grid = document.querySelector('.fmn-attention-grid');
return !!grid && !!grid.closest('[data-node-id]') && grid.querySelectorAll('.fmn-attention-cell').length"""


def test_grid_shows_in_the_vue_node_renderer(server: ComfyServer, frontend: WebDriver) -> None:
    """The same workflow with the front end's Vue node renderer switched on: the viewer's
    grid is drawn inside the Vue node, one cell per word and model, every map loaded."""
    requests.post(f"{server.url}/api/settings/{VUE_NODES}", json=True, timeout=30).raise_for_status()
    try:
        open_frontend(frontend, server.url)
        frontend.execute_script("return window.comfyAPI.app.app.loadGraphData(arguments[0])", json.loads(WORKFLOW.read_text()))
        WebDriverWait(frontend, PAGE_TIMEOUT_S, POLL_S).until(
            lambda d: d.execute_script("return document.querySelectorAll('[data-node-id]').length") > 0,
            "the Vue renderer drew no node")
        for node_type, steps in FEWER_STEPS.items():
            frontend.execute_script(SET_WIDGET_JS, node_type, "steps", steps)
        frontend.execute_script("return window.comfyAPI.app.app.queuePrompt(0)")
        cells = WebDriverWait(frontend, RUN_TIMEOUT_S, POLL_S).until(
            lambda d: d.execute_script(GRID_IN_VUE_NODE_JS), f"no grid in the Vue node within {RUN_TIMEOUT_S:.0f} s")
        assert cells == len(MODELS) * len(WORDS)
        wait_for_images(frontend)
        frontend.save_screenshot(str(ARTIFACTS / "attention_maps_vue_nodes.png"))
    finally:
        requests.post(f"{server.url}/api/settings/{VUE_NODES}", json=False, timeout=30).raise_for_status()
