"""The pack's in-UI documentation, derived from what the server itself serves.

Two files follow the nodes' own definitions (descriptions, tooltips, defaults) as the real
server's `/object_info` reports them, so they cannot drift from the code:

- `locales/en/nodeDefs.json`: names and tooltips in the frontend's i18n layout, so the pack
  can be translated by adding `locales/<lang>/nodeDefs.json`;
- the "Inputs" and "Outputs" tables of each help page `web/docs/<node id>.md` (the host's
  help-panel convention; the Info button over a selected node opens it). The rest of a page (intro,
  picture, tips) is written by hand and left as it is.

`python scripts/node_docs.py` rewrites both from a real server started on loopback;
`--check` only says whether they are current (tests/test_server.py checks the same).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCALE = REPO / "locales" / "en" / "nodeDefs.json"
DOCS = REPO / "web" / "docs"
PREFIX = "FMN_"
TABLE_HEADINGS = ("## Inputs", "## Outputs")


def pack_nodes(object_info: dict) -> dict:
    """The pack's nodes in /object_info, by id."""
    return {node_id: node for node_id, node in sorted(object_info.items()) if node_id.startswith(PREFIX)}


def inputs_of(node: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) for every input, required ones first, in the node's order."""
    sections = node["input"]
    return [(name, spec, section == "optional") for section in ("required", "optional")
            for name, spec in sections.get(section, {}).items()]


def locale_entry(node: dict) -> dict:
    """One node in the frontend's `nodeDefs` i18n layout."""
    tooltips = node.get("output_tooltips") or [""] * len(node["output"])
    return {
        "display_name": node["display_name"],
        "description": node["description"],
        "inputs": {name: {"name": name, "tooltip": (spec[1] if len(spec) > 1 else {}).get("tooltip", "")}
                   for name, spec, _ in inputs_of(node)},
        "outputs": {str(i): {"name": name, "tooltip": tip}
                    for i, (name, tip) in enumerate(zip(node["output_name"], tooltips))},
    }


def locale(object_info: dict) -> dict:
    return {node_id: locale_entry(node) for node_id, node in pack_nodes(object_info).items()}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_and_default(spec: list) -> tuple[str, str]:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return "choice: " + ", ".join(f"`{k}`" for k in kind[:6]) + (" ..." if len(kind) > 6 else ""), \
            f"`{options['default']}`" if "default" in options else ""
    default = options.get("default")
    if default is None or kind in ("MODEL", "CLIP", "VAE", "IMAGE", "LATENT"):
        return kind, ""
    return kind, "(empty)" if default == "" else f"`{_cell(default)}`"


def tables(node: dict) -> str:
    """The generated part of a help page: its Inputs and Outputs tables."""
    rows = ["## Inputs", "", "| Input | Type | Default | What it does |", "|---|---|---|---|"]
    for name, spec, optional in inputs_of(node):
        kind, default = _type_and_default(spec)
        tip = (spec[1] if len(spec) > 1 else {}).get("tooltip", "")
        rows.append(f"| `{name}`{' (optional)' if optional else ''} | {kind} | {default} | {_cell(tip)} |")
    if not inputs_of(node):
        rows = ["## Inputs", "", "None."]
    rows += ["", "## Outputs", ""]
    if node["output"]:
        rows += ["| Output | Type | What it holds |", "|---|---|---|"]
        tips = node.get("output_tooltips") or [""] * len(node["output"])
        rows += [f"| `{name}` | {kind} | {_cell(tip)} |" for name, kind, tip in zip(node["output_name"], node["output"], tips)]
    else:
        rows.append("None: this node's work is its side effect (see above).")
    return "\n".join(rows) + "\n"


def with_tables(page: str, node: dict) -> str:
    """`page` with its Inputs/Outputs sections replaced by freshly generated ones (appended
    after the hand-written part when the page has none yet)."""
    lines = page.rstrip("\n").split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() in TABLE_HEADINGS), len(lines))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("## ") and lines[i].strip() not in TABLE_HEADINGS), len(lines))
    head = "\n".join(lines[:start]).rstrip("\n") + "\n\n"
    tail = "\n".join(lines[end:])
    return head + tables(node) + ("\n" + tail + "\n" if tail else "")


def expected_files(object_info: dict) -> dict[Path, str]:
    """Every generated file's path -> its current text (help pages must already exist)."""
    out = {LOCALE: json.dumps(locale(object_info), indent=2, ensure_ascii=False) + "\n"}
    for node_id, node in pack_nodes(object_info).items():
        page = DOCS / f"{node_id}.md"
        if not page.is_file():
            raise FileNotFoundError(f"{page.relative_to(REPO)} is missing: write the node's help page "
                                    "(a title, what it is for, a picture), then run scripts/node_docs.py")
        out[page] = with_tables(page.read_text(), node)
    return out


def stale(object_info: dict) -> list[str]:
    """Generated files that differ from what the nodes say now."""
    return [str(path.relative_to(REPO)) for path, text in expected_files(object_info).items()
            if not path.is_file() or path.read_text() != text]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when a generated file is out of date")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_server import running_server

    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp)) as server:
        object_info = server.get("/object_info")
    if args.check:
        old = stale(object_info)
        print("\n".join(f"out of date: {p}" for p in old) or "node docs are current")
        return 1 if old else 0
    for path, text in expected_files(object_info).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
