"""Convert a ComfyUI UI (litegraph) workflow into the API prompt form, against /object_info.

The pack ships UI workflows (what the frontend loads and saves); the server executes API
prompts. Converting here with the real server's node definitions, strictly, proves the
shipped files match those definitions: every node type must exist, every link must join an
output and an input of the same type, and `widgets_values` must hold exactly one value per
widget input of the node (plus the frontend's extra "control_after_generate" value after an
INT seed), in the order the frontend creates the widgets.
"""
from __future__ import annotations

from typing import Any

# Types the frontend draws as widgets (a list of options is a combo).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# The frontend adds a "control after generate" widget to INT inputs with these names
# unless the definition says otherwise.
SEED_NAMES = {"seed", "noise_seed"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}  # a control_after_generate widget's choices
# Frontend-only nodes: never sent to the server.
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE = "Reroute"
UI_FORMAT_VERSION = 0.4

Link = tuple[int, int, int, int, str]  # origin node, origin slot, target node, target slot, type


class WorkflowError(ValueError):
    """The UI workflow does not match the server's node definitions."""


def _input_specs(node_def: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of every input, required first, in definition order."""
    order = node_def.get("input_order") or {s: list(node_def["input"].get(s, {})) for s in ("required", "optional")}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = node_def["input"][section][name]
            specs.append((name, spec[0], spec[1] if len(spec) > 1 else {}))
    return specs


def _is_widget(kind: Any, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def _has_control_widget(name: str, kind: Any, options: dict) -> bool:
    """Mirrors the frontend: `control_after_generate ?? name in (seed, noise_seed)` for INTs."""
    return kind == "INT" and bool(options.get("control_after_generate", name in SEED_NAMES))


def widget_names(node_def: dict) -> list[str | None]:
    """The node's widgets_values layout: input names, None for a control_after_generate value."""
    names: list[str | None] = []
    for name, kind, options in _input_specs(node_def):
        if _is_widget(kind, options):
            names.append(name)
            if _has_control_widget(name, kind, options):
                names.append(None)
    return names


def _added_widget_defaults(node_def: dict, missing: list[str | None]) -> list[Any]:
    """Defaults of the trailing widgets a workflow saved before the node gained them lacks,
    as the frontend fills them in; none when any of them is required or has no default."""
    optional = node_def["input"].get("optional", {})
    specs = [optional.get(name, [None])[1:] for name in missing]
    if any(not spec or "default" not in spec[0] for spec in specs):
        return []
    return [spec[0]["default"] for spec in specs]


def _links(workflow: dict) -> dict[int, Link]:
    return {link[0]: (link[1], link[2], link[3], link[4], link[5]) for link in workflow["links"]}


def _resolve(link_id: int, links: dict[int, Link], nodes: dict[int, dict]) -> tuple[int, int, str]:
    """Origin (node, slot, type) of a link, followed upstream through reroute nodes."""
    for _ in range(len(nodes) + 1):
        origin, slot, _, _, kind = links[link_id]
        node = nodes[origin]
        if node["type"] != REROUTE:
            return origin, slot, kind
        link_id = node["inputs"][0]["link"]
        if link_id is None:
            raise WorkflowError(f"reroute node {origin} has no input")
    raise WorkflowError(f"reroute cycle at link {link_id}")


def _types_match(a: Any, b: Any) -> bool:
    """Socket compatibility as the frontend checks it: equal, a wildcard, or a shared member of a,b,c lists."""
    if "*" in (a, b):
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def _convert_node(node: dict, node_def: dict, links: dict[int, Link], nodes: dict[int, dict],
                  object_info: dict) -> dict:
    specs = {name: kind for name, kind, _ in _input_specs(node_def)}
    inputs: dict[str, Any] = {}
    for slot in node.get("inputs", []):
        if slot.get("link") is None:
            continue
        name = slot["name"]
        if name not in specs:
            raise WorkflowError(f"node {node['id']} ({node['type']}) has no input {name!r}")
        origin, origin_slot, _ = _resolve(slot["link"], links, nodes)
        origin_outputs = object_info[nodes[origin]["type"]]["output"]
        if origin_slot >= len(origin_outputs):
            raise WorkflowError(f"link into {node['type']}.{name} comes from missing output {origin_slot} of node {origin}")
        if not _types_match(origin_outputs[origin_slot], "COMBO" if isinstance(specs[name], list) else specs[name]):
            raise WorkflowError(f"{node['type']}.{name} ({specs[name]}) is fed a {origin_outputs[origin_slot]}")
        inputs[name] = [str(origin), origin_slot]

    layout = widget_names(node_def)
    values = node.get("widgets_values", [])
    values = values + _added_widget_defaults(node_def, layout[len(values):])
    if len(values) != len(layout):
        raise WorkflowError(f"node {node['id']} ({node['type']}) has {len(node.get('widgets_values', []))} widget "
                            f"values, its definition expects {len(layout)}: {layout}")
    if any(name is None and value not in CONTROL_VALUES for name, value in zip(layout, values)):
        raise WorkflowError(f"node {node['id']} ({node['type']}) has widget values out of line with its definition "
                            f"{layout}: {values}")
    for name, value in zip(layout, values):
        if name is not None and name not in inputs:
            inputs[name] = value
    return {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node_def["display_name"])}}


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API prompt {node id: {class_type, inputs, _meta}} of a UI workflow.

    Notes and reroutes are dropped (links are followed through reroutes); any node type
    the server does not know is an error, as are muted or bypassed nodes, which the shipped
    workflows do not use.
    """
    if workflow.get("version") != UI_FORMAT_VERSION:
        raise WorkflowError(f"expected UI workflow format {UI_FORMAT_VERSION}, got {workflow.get('version')!r}")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = _links(workflow)
    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in NOTE_TYPES or node["type"] == REROUTE:
            continue
        if node["type"] not in object_info:
            raise WorkflowError(f"node {node_id} has type {node['type']!r}, which the server does not define")
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node_id} ({node['type']}) is muted or bypassed (mode {node['mode']})")
        prompt[str(node_id)] = _convert_node(node, object_info[node["type"]], links, nodes, object_info)
    return prompt


def node_ids(prompt: dict[str, dict], class_type: str) -> list[str]:
    """Ids of the prompt's nodes of one type, in node-id order (for test overrides)."""
    found = [k for k in sorted(prompt, key=int) if prompt[k]["class_type"] == class_type]
    if not found:
        raise KeyError(f"no {class_type} node in the prompt")
    return found


def nodes_of(prompt: dict[str, dict], class_type: str) -> list[dict]:
    return [prompt[k] for k in node_ids(prompt, class_type)]


def set_inputs(prompt: dict[str, dict], class_type: str, **values: Any) -> None:
    """Override widget inputs on every node of a type; refuses names that are not widget
    inputs of the node (unknown, or fed by a link), so a typo cannot pass silently."""
    for node in nodes_of(prompt, class_type):
        widgets = {k for k, v in node["inputs"].items() if not isinstance(v, list)}
        unknown = set(values) - widgets
        if unknown:
            raise KeyError(f"{class_type} has no widget inputs {sorted(unknown)}")
        node["inputs"].update(values)


SIMPLE_TRAIN, ADVANCED_TRAIN = "FMN_ForgetTrainSimple", "FMN_ForgetTrain"


def with_advanced_train(prompt: dict[str, dict], object_info: dict) -> dict[str, dict]:
    """Every simple Forget Train of an API prompt as Forget Train (Advanced) with the same
    inputs, and the advanced node's other widget inputs at the defaults it declares: those
    are ForgetConfig's, which the simple node trains with, so the run is the same until a
    caller sets an advanced knob (a test or the demo shrinking `resolution` to its small
    model)."""
    defaults = {name: _default(kind, options) for name, kind, options in _input_specs(object_info[ADVANCED_TRAIN])
                if _is_widget(kind, options)}
    for node in prompt.values():
        if node["class_type"] == SIMPLE_TRAIN:
            node["class_type"] = ADVANCED_TRAIN
            node["inputs"] = {**defaults, **node["inputs"]}
    return prompt


def _default(kind: Any, options: dict) -> Any:
    """A widget input's declared default; a combo without one starts at its first choice."""
    if "default" in options:
        return options["default"]
    return (kind if isinstance(kind, list) else options["options"])[0]
