"""The ToyBench world: procedurally drawn 32x32 images with prompts.

Twelve concepts in three categories:

- identities: named face-like composites ("Captain Zorb", ...), each with its own face
  shape, colours, features and backdrop;
- objects: ring, cross, star, moon;
- styles: zebra (black/white stripes on orange), checkers (red/white checks on dark
  green), neon (bright outline on black), pastel (soft fill with white rim on sky blue).

Prompts: "a portrait of {identity}", "a {object}" (plain style: white on grey, not a
concept), "a {object} in the style of {style}". Every image carries labels for the three
heads of the oracle: identity, object and style, where index 0 means "none".

Generic scenes name no concept: "a portrait of a person" (a plain face), "an object" (a
half disc, in no concept's shape), "an object in the style of {style}" and "... in the
style of" with no style (drawn plain). They give the model what a real one has,
"someone", "something" and "no style in particular", so that a forgotten concept can
fall back to them (the pack's default anchors) instead of to one of its neighbours.

32 px images give 4x4 latents with the SD VAE factor 8: small enough to train on two CPU
cores in minutes. Nuisances (position, size, colour jitter, pixel noise) keep the
images from being exact copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZE = 32
SUPER = 2  # supersampling factor for anti-aliasing

IDENTITIES = ("Captain Zorb", "Madame Plink", "Doctor Vex", "Baron Quog")
OBJECTS = ("ring", "cross", "star", "moon")
STYLES = ("zebra", "checkers", "neon", "pastel")
CATEGORIES = {"identity": IDENTITIES, "object": OBJECTS, "style": STYLES}
CONCEPTS = IDENTITIES + OBJECTS + STYLES


@dataclass(frozen=True)
class Scene:
    identity: int = 0  # 0 = none, else 1 + index into IDENTITIES
    object: int = 0
    style: int = 0
    person: bool = False  # a generic face: "a portrait of a person"
    bare_style: bool = False  # "... in the style of" with no style named: drawn plain

    @property
    def prompt(self) -> str:
        if self.person:
            return "a portrait of a person"
        if self.identity:
            return f"a portrait of {IDENTITIES[self.identity - 1]}"
        obj = f"a {OBJECTS[self.object - 1]}" if self.object else "an object"
        if self.style:
            return f"{obj} in the style of {STYLES[self.style - 1]}"
        return f"{obj} in the style of" if self.bare_style else obj

    @property
    def concepts(self) -> tuple[str, ...]:
        out = []
        if self.identity:
            out.append(IDENTITIES[self.identity - 1])
        if self.object:
            out.append(OBJECTS[self.object - 1])
        if self.style:
            out.append(STYLES[self.style - 1])
        return tuple(out)


def all_scenes() -> list[Scene]:
    """Every prompt of the world: 4 portraits, 4 plain objects, 16 styled objects, 4
    objects "in the style of" nothing, then the 7 generic scenes."""
    scenes = [Scene(identity=i) for i in range(1, 5)]
    scenes += [Scene(object=o) for o in range(1, 5)]
    scenes += [Scene(object=o, style=s) for o in range(1, 5) for s in range(1, 5)]
    scenes += [Scene(object=o, bare_style=True) for o in range(1, 5)]
    return scenes + generic_scenes()


def generic_scenes() -> list[Scene]:
    """Scenes that name no concept: a person, an object, an object in each style and in
    the style of nothing.

    "in the style of" with the style left out is drawn plain, as a real model draws a
    generic picture when the artist's name is gone: it is what the pack's default style
    anchor (the prompt without the style) should produce, so the toy must know it."""
    plain = [Scene(person=True), Scene(), Scene(bare_style=True)]
    return plain + [Scene(style=s) for s in range(1, 5)]


def scenes_for(concept: str) -> list[Scene]:
    """The scenes whose prompt names `concept`."""
    return [s for s in all_scenes() if concept in s.concepts]


# ----------------------------------------------------------------------------- drawing

def _grid(n: int):
    c = (np.arange(n) + 0.5) / n * SIZE
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def _paint(img, mask, colour):
    m = np.clip(mask, 0.0, 1.0)[..., None]
    img[:] = img * (1 - m) + np.asarray(colour, dtype=np.float32) * m


def _circle(x, y, cx, cy, r):
    return (np.hypot(x - cx, y - cy) <= r).astype(np.float32)


def _rect(x, y, x0, y0, x1, y1):
    return ((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)).astype(np.float32)


def _polygon(x, y, pts):
    """Even-odd fill of a polygon given as [(x, y), ...]."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        cond = ((y0 > y) != (y1 > y)) & (x < (x1 - x0) * (y - y0) / (y1 - y0 + 1e-9) + x0)
        inside ^= cond
    return inside.astype(np.float32)


def _line(x, y, x0, y0, x1, y1, w):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    return (np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)) <= w / 2).astype(np.float32)


def _object_mask(kind: int, x, y, cx, cy, s):
    """Mask of object `kind` (1..4; 0: the generic half disc) centred at (cx, cy), scale s (~1).

    The generic shape is a half disc, flat side up: far from every concept at the 4x4
    latent grid. (It was a rounded block until run 7; blurred by the VAE, the block was
    seen as a star in a third of round trips, so a forgotten star fell back to a star.)"""
    r = 10.0 * s
    if kind == 0:
        return _circle(x, y, cx, cy - r * 0.3, r) * (y >= cy - r * 0.3)
    if kind == 1:  # ring
        d = np.hypot(x - cx, y - cy)
        return ((d <= r) & (d >= r * 0.55)).astype(np.float32)
    if kind == 2:  # cross
        w = r * 0.38
        return np.maximum(_rect(x, y, cx - w, cy - r, cx + w, cy + r), _rect(x, y, cx - r, cy - w, cx + r, cy + w))
    if kind == 3:  # star, five points
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r * 1.1 if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return _polygon(x, y, pts)
    if kind == 4:  # crescent moon
        return _circle(x, y, cx, cy, r) * (1 - _circle(x, y, cx + r * 0.55, cy - r * 0.25, r * 0.8))
    raise ValueError(kind)


def _outline(mask, width: int):
    """Pixels of `mask` within `width` pixels of its border (on the supersampled grid)."""
    m = mask > 0.5
    er = m.copy()
    for _ in range(width):
        p = np.pad(er, 1)
        er = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return (m & ~er).astype(np.float32)


def _jit(rng, colour, amount=0.06):
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def _draw_identity(img, ident, x, y, rng):
    cx, cy = SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-1.5, 1.5)
    s = rng.uniform(0.9, 1.1)
    if ident == 1:  # Captain Zorb: green round face, one big eye, two antennae, navy backdrop
        img[:] = _jit(rng, (0.05, 0.07, 0.30))
        _paint(img, _line(x, y, cx - 4 * s, cy - 8 * s, cx - 7 * s, cy - 14 * s, 1.5), _jit(rng, (0.3, 0.95, 0.3)))
        _paint(img, _line(x, y, cx + 4 * s, cy - 8 * s, cx + 7 * s, cy - 14 * s, 1.5), _jit(rng, (0.3, 0.95, 0.3)))
        _paint(img, _circle(x, y, cx, cy + 1, 10 * s), _jit(rng, (0.25, 0.80, 0.25)))
        _paint(img, _circle(x, y, cx, cy, 5 * s), (1.0, 1.0, 1.0))
        _paint(img, _circle(x, y, cx, cy, 2.2 * s), (0.0, 0.0, 0.0))
    elif ident == 2:  # Madame Plink: pink face, two eyes, red triangle hat, pale yellow backdrop
        img[:] = _jit(rng, (0.98, 0.95, 0.65))
        _paint(img, _circle(x, y, cx, cy + 3, 9 * s), _jit(rng, (0.98, 0.55, 0.75)))
        _paint(img, _polygon(x, y, [(cx - 10 * s, cy - 3), (cx + 10 * s, cy - 3), (cx, cy - 15 * s)]), _jit(rng, (0.85, 0.1, 0.1)))
        _paint(img, _circle(x, y, cx - 3.5 * s, cy + 2, 1.6 * s), (0.05, 0.05, 0.05))
        _paint(img, _circle(x, y, cx + 3.5 * s, cy + 2, 1.6 * s), (0.05, 0.05, 0.05))
        _paint(img, _line(x, y, cx - 3 * s, cy + 7 * s, cx + 3 * s, cy + 7 * s, 1.2), (0.6, 0.1, 0.2))
    elif ident == 3:  # Doctor Vex: blue square face, yellow goggles, white beard, light grey backdrop
        img[:] = _jit(rng, (0.80, 0.80, 0.82))
        _paint(img, _rect(x, y, cx - 9 * s, cy - 10 * s, cx + 9 * s, cy + 8 * s), _jit(rng, (0.15, 0.35, 0.95)))
        _paint(img, _rect(x, y, cx - 9 * s, cy - 5 * s, cx + 9 * s, cy - 1 * s), _jit(rng, (1.0, 0.85, 0.1)))
        _paint(img, _polygon(x, y, [(cx - 8 * s, cy + 3 * s), (cx + 8 * s, cy + 3 * s), (cx, cy + 15 * s)]), (0.97, 0.97, 0.97))
    elif ident == 4:  # Baron Quog: orange diamond face, black X eyes, wide mouth, teal backdrop
        img[:] = _jit(rng, (0.0, 0.50, 0.50))
        _paint(img, _polygon(x, y, [(cx, cy - 13 * s), (cx + 12 * s, cy), (cx, cy + 13 * s), (cx - 12 * s, cy)]), _jit(rng, (1.0, 0.55, 0.05)))
        for ex in (-4.5, 4.5):
            _paint(img, _line(x, y, cx + ex * s - 2, cy - 5, cx + ex * s + 2, cy - 1, 1.2), (0.0, 0.0, 0.0))
            _paint(img, _line(x, y, cx + ex * s - 2, cy - 1, cx + ex * s + 2, cy - 5, 1.2), (0.0, 0.0, 0.0))
        _paint(img, _rect(x, y, cx - 6 * s, cy + 4 * s, cx + 6 * s, cy + 6 * s), (0.1, 0.0, 0.0))
    else:
        raise ValueError(ident)


def _draw_person(img, x, y, rng):
    """A plain face: beige oval, two dot eyes, a short mouth, warm grey backdrop."""
    cx, cy = SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-1.5, 1.5)
    s = rng.uniform(0.9, 1.1)
    img[:] = _jit(rng, (0.55, 0.50, 0.45))
    face = np.clip(((x - cx) / (8.5 * s)) ** 2 + ((y - cy) / (11 * s)) ** 2, 0, 2) <= 1
    _paint(img, face.astype(np.float32), _jit(rng, (0.93, 0.78, 0.62)))
    for ex in (-3.2, 3.2):
        _paint(img, _circle(x, y, cx + ex * s, cy - 2 * s, 1.2 * s), (0.15, 0.1, 0.05))
    _paint(img, _line(x, y, cx - 2.5 * s, cy + 5 * s, cx + 2.5 * s, cy + 5 * s, 1.0), (0.55, 0.25, 0.2))


def _draw_object(img, kind, style, x, y, rng):
    """Object `kind` (0 = the generic half disc) in `style` (0 = plain)."""
    cx, cy = SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-2, 2)
    mask = _object_mask(kind, x, y, cx, cy, rng.uniform(0.9, 1.15))
    if style == 0:  # plain
        img[:] = _jit(rng, (0.5, 0.5, 0.5))
        _paint(img, mask, _jit(rng, (0.97, 0.97, 0.97), 0.03))
    elif style == 1:  # zebra: diagonal black/white stripes on orange
        img[:] = _jit(rng, (0.95, 0.55, 0.10))
        stripes = (((x + y) // 4) % 2).astype(np.float32)
        _paint(img, mask, (0.98, 0.98, 0.98))
        _paint(img, mask * stripes, (0.02, 0.02, 0.02))
    elif style == 2:  # checkers: red/white checks on dark green
        img[:] = _jit(rng, (0.05, 0.30, 0.10))
        checks = (((x // 4) + (y // 4)) % 2).astype(np.float32)
        _paint(img, mask, (0.95, 0.95, 0.95))
        _paint(img, mask * checks, (0.85, 0.05, 0.05))
    elif style == 3:  # neon: glowing magenta outline on black
        img[:] = _jit(rng, (0.02, 0.02, 0.04), 0.02)
        _paint(img, _outline(mask, 3 * SUPER), _jit(rng, (1.0, 0.15, 0.95)))
    elif style == 4:  # pastel: lavender fill, white rim, sky-blue backdrop
        img[:] = _jit(rng, (0.62, 0.82, 0.98))
        _paint(img, mask, (1.0, 1.0, 1.0))
        inner = mask - _outline(mask, 2 * SUPER)
        _paint(img, inner, _jit(rng, (0.80, 0.65, 0.95)))
    else:
        raise ValueError(style)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One image (SIZE, SIZE, 3), float32 in [0, 1]."""
    n = SIZE * SUPER
    x, y = _grid(n)
    img = np.zeros((n, n, 3), dtype=np.float32)
    if scene.person:
        _draw_person(img, x, y, rng)
    elif scene.identity:
        _draw_identity(img, scene.identity, x, y, rng)
    else:
        _draw_object(img, scene.object, scene.style, x, y, rng)
    img = img.reshape(SIZE, SUPER, SIZE, SUPER, 3).mean(axis=(1, 3))
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def labels(scene: Scene) -> tuple[int, int, int]:
    return scene.identity, scene.object, scene.style


def dataset(n: int, seed: int):
    """n images drawn uniformly over all scenes: (images N,H,W,3 float32, labels N,3 int64, scenes)."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    picks = rng.integers(0, len(scenes), n)
    chosen = [scenes[i] for i in picks]
    images = np.stack([render(s, rng) for s in chosen])
    return images, np.array([labels(s) for s in chosen], dtype=np.int64), chosen


def images_of(concept: str, count: int, seed: int) -> np.ndarray:
    """`count` rendered images (N, H, W, 3) showing `concept`, cycling over its scenes:
    the pictures a user would give Forget Train or Concept Inversion."""
    rng = np.random.default_rng(seed)
    scenes = scenes_for(concept)
    return np.stack([render(scenes[i % len(scenes)], rng) for i in range(count)])
