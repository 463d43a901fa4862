"""Concepts to forget: parsing the node's one-per-line text and the prompt templates.

A line is `concept`, optionally followed by `| category` (a registered category or a
custom template containing `{}`), `| images=A-B` (which images of the batch show this
concept; default: all) and `| anchor=TEXT` (what the concept's prompts should turn into;
default: the category's anchor). A line `preset:NAME` stands for a ready list of concept
lines (`PRESETS`). Examples:

    Van Gogh | style
    a red fox
    embedding:my_cat | identity | images=0-3
    Mickey Mouse | a cartoon of {} waving | anchor=a mouse
    preset:nsfw
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("a photo of {}", "an image of {}", "a picture of {}", "{} in a scene", "a close-up photo of {}"),
    "style": ("a painting in the style of {}", "an artwork by {}", "a picture in the style of {}", "{} style art", "a landscape painted by {}"),
    "identity": ("a photo of {}", "a portrait of {}", "{} smiling", "a picture of {} in a crowd", "a close-up of {}'s face"),
    # Words that make a picture of people explicit: used as adjectives of a figure, so the
    # anchor ("clothed") gives the same sentence about a dressed figure.
    "nsfw": ("a photo of a {} woman", "a photo of a {} man", "a {} person on a bed", "a painting of a {} figure",
             "{} art"),
}

# What a forgotten concept falls back to: someone, something, or (styles, custom
# templates) the prompt without it. A generic word keeps the sentence whole; a plain gap
# lets the model fill it with whatever the rest of the prompt suggests.
ANCHORS: dict[str, str] = {"object": "an object", "identity": "a person", "style": "", "custom": "", "nsfw": "clothed"}

# `preset:NAME` lines. Text only: the words and the templates above, no images.
PRESETS: dict[str, tuple[str, ...]] = {
    "nsfw": tuple(f"{word} | nsfw" for word in ("nude", "naked", "nudity", "topless", "erotic", "sexual", "nsfw", "explicit")),
}
_PRESET = re.compile(r"^preset\s*:\s*(\S*)$")

_IMAGES = re.compile(r"^images\s*=\s*(\d+)\s*(?:-\s*(\d+))?$")
_ANCHOR = re.compile(r"^anchor\s*=(.*)$")


@dataclass(frozen=True)
class Concept:
    text: str
    category: str
    templates: tuple[str, ...]
    images: tuple[int, int] | None = None  # inclusive index range into the image batch
    anchor: str = ""  # what the concept's prompts should turn into ("" = leave it out)

    def prompts(self) -> list[str]:
        return [t.format(self.text) for t in self.templates]

    def anchor_prompts(self) -> list[str]:
        """The same prompts with the anchor in the concept's place: what forgetting should look like."""
        return [" ".join(t.format(self.anchor).split()) for t in self.templates]


_ARTICLE_SLOT = re.compile(r"\b(?:a|an)\s+\{\}", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:a|an|the)\s", re.IGNORECASE)


def filled(template: str, words: str) -> str:
    """`template` with `words` in its {}, spaces tidied; words that bring their own article
    replace the template's ('a {}' with 'an object' reads 'an object', not 'a an object')."""
    if _ARTICLE.match(words):
        template = _ARTICLE_SLOT.sub("{}", template)
    return " ".join(template.format(words).split())


def _templates_for(field: str, line: str) -> tuple[str, tuple[str, ...]]:
    if field in TEMPLATES:
        return field, TEMPLATES[field]
    if "{}" in field:
        return "custom", (field,)
    raise ValueError(
        f"unknown category {field!r} in concept line {line!r}: use one of {', '.join(TEMPLATES)} "
        "or a template containing {} (e.g. 'a photo of {} at night')"
    )


def parse_concepts(text: str) -> list[Concept]:
    """One Concept per non-empty line; a clear error for anything malformed."""
    concepts = []
    for raw in _expand_presets(text):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("|")]
        if not fields[0]:
            raise ValueError(f"concept line {line!r} has no concept before '|'")
        category, templates = "object", TEMPLATES["object"]
        images, anchor = None, None
        for field in fields[1:]:
            match = _IMAGES.match(field)
            named_anchor = _ANCHOR.match(field)
            if named_anchor:
                anchor = " ".join(named_anchor.group(1).split())
                if anchor.lower() == fields[0].lower():
                    raise ValueError(f"the anchor of {line!r} is the concept itself: give a different anchor, or none")
            elif match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else start
                if end < start:
                    raise ValueError(f"image range {field!r} in {line!r} runs backwards: write images={end}-{start}")
                images = (start, end)
            else:
                category, templates = _templates_for(field, line)
        concepts.append(Concept(fields[0], category, templates, images, ANCHORS[category] if anchor is None else anchor))
    if not concepts:
        raise ValueError("no concepts given: write one concept per line, e.g. 'Van Gogh | style'")
    return concepts


def _expand_presets(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        match = _PRESET.match(raw.strip())
        if match is None:
            lines.append(raw)
        elif match.group(1) in PRESETS:
            lines.extend(PRESETS[match.group(1)])
        else:
            raise ValueError(f"unknown preset {match.group(1)!r} in {raw.strip()!r}: use one of "
                             + ", ".join(f"preset:{name}" for name in PRESETS))
    return lines


KEEP_TEMPLATES = ("a photo of {}", "a painting of {}", "{}")


def parse_keep(text: str, concepts: list[Concept], listed: str = "keep") -> tuple[str, ...]:
    """The keep list, or the watch list (`listed`), comma- or line-separated; none may also
    be forgotten."""
    items = tuple(dict.fromkeys(" ".join(k.split()) for k in re.split(r"[,\n]", text or "") if k.strip()))
    forgotten = {c.text.lower() for c in concepts}
    overlap = [k for k in items if k.lower() in forgotten]
    if overlap:
        raise ValueError(f"{', '.join(overlap)}: in both the forget and the {listed} list; remove it from one of them")
    return items


def with_kept(concept: Concept, keep: tuple[str, ...]) -> Concept:
    """`concept` with its templates also written beside each kept concept ("a photo of {},
    zebra"): their anchor versions keep it, so forgetting learns to leave it standing."""
    escaped = [k.replace("{", "{{").replace("}", "}}") for k in keep]
    return replace(concept, templates=concept.templates + tuple(f"{t}, {k}" for t in concept.templates for k in escaped))


def keep_prompts(keep: tuple[str, ...]) -> list[str]:
    """Prompts of the kept concepts alone: the patched model must denoise them as the original does."""
    return [t.format(k) for k in keep for t in KEEP_TEMPLATES]


# Ordinary prompts whose contexts an aimed update must leave alone. Broad on purpose:
# people, animals, objects, places, styles and plain function words.
PRESERVE_WORDS = (
    "person", "man", "woman", "child", "dog", "cat", "horse", "bird", "car", "house", "tree", "flower",
    "mountain", "river", "city street", "beach", "forest", "table", "chair", "cup", "book", "phone",
    "bicycle", "boat", "airplane", "train", "bridge", "castle", "garden", "kitchen", "bedroom", "sky",
    "sunset", "snow", "rain", "portrait", "landscape", "painting", "drawing", "sculpture", "building",
    "apple", "banana", "pizza", "cake", "guitar", "piano", "clock", "lamp", "window", "door",
    "red", "blue", "green", "yellow", "black and white", "bright", "dark", "old", "new", "small", "large",
    "watercolor", "oil painting", "sketch", "photograph", "cartoon", "3d render", "pixel art", "digital art",
)
PRESERVE_TEMPLATES = ("a photo of {}", "a painting of {}", "{}")
PRESERVE_GROUP = 3


def preserve_prompts() -> list[str]:
    """The preserve words, several to a prompt: word contexts stay realistic (CLIP sees
    lists all the time) while the text encoder runs a few dozen prompts, not hundreds."""
    groups = [PRESERVE_WORDS[i:i + PRESERVE_GROUP] for i in range(0, len(PRESERVE_WORDS), PRESERVE_GROUP)]
    return [t.format(", ".join(g)) for g in groups for t in PRESERVE_TEMPLATES] + [""]
