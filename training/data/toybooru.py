"""Toybooru: a procedural, deterministic stand-in for RetriBooru.

RetriBooru (seed 001, Sec. 3 and Fig. 2; seed 002, A.1) groups Danbooru figures into clusters
of the same character, drawn by the same artist, wearing the same outfit, and annotates each
picture with Danbooru tags, cloth tags, a head bounding box, a figure mask and the list of
"similar" pictures (the other members of its cluster). Toybooru draws anime-like figures with
PIL and writes exactly that schema, with the generator's own attributes as ground truth, so
that every later stage (detection, segmentation, clustering, composition) can be measured.

Identity is (character, artist, outfit). Within a cluster everything else varies: pose (arms,
legs, lean), position, scale, horizontal flip, background, and framing (full figure,
close-up, upside-down, head near the bottom; the last three exercise the paper's
"y_max > 2/3 of the height" rule).

``--scene demo`` draws every picture as a large, upright full figure on a flat background, and
``--scene demo-cowboy`` as an upright cowboy shot (head at the top, cut at the thighs: the figure
about 1.4 times the picture's height) on a flat background; the same characters, outfits and
clusters, only the framing changes. The demo family trains on the cowboy shots (v10 and earlier on the
full figures). At 64 px a full
figure's eyes are 2 pixels wide and its patterns 1 to 2 pixels fine, which a 16 x 16 latent loses;
a cowboy shot draws both at about 1.5 times the size, the skirts still in the picture (BENCHMARKS.md,
"Cowboy shots", has what a family built on them reads).
``--scene demo-bold`` draws the cowboy shots with bold features: patterns that repeat every eighth of the
picture side (two cells of a 16 x 16 latent) and pupils shrunk to a dot, so that the iris's colour fills
the eye; the same pictures otherwise.

Run ``python -m training.data.toybooru --out DIR --num-images N --seed S --size PX [--scene SCENE]``.
The same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from training.files import replacing_folder

GENERATOR_VERSION = 1

# --------------------------------------------------------------------------- vocabularies

HAIR_COLORS = {
    "red": (214, 48, 49), "blue": (52, 101, 214), "green": (46, 160, 67), "pink": (245, 140, 186),
    "purple": (142, 68, 173), "blonde": (246, 211, 101), "brown": (133, 87, 35),
    "black": (45, 45, 52), "white": (240, 240, 245), "silver": (176, 184, 196),
    "orange": (243, 134, 48), "aqua": (64, 204, 208),
}
HAIR_STYLES = ("long", "short", "twintails", "ponytail", "bob")
EYE_COLORS = {
    "red": (200, 30, 40), "blue": (40, 90, 220), "green": (30, 150, 60), "brown": (120, 70, 30),
    "purple": (130, 50, 170), "yellow": (230, 190, 20), "pink": (235, 100, 160),
    "aqua": (30, 190, 200),
}
CLOTH_COLORS = {
    "red": (200, 40, 50), "blue": (40, 80, 190), "green": (40, 140, 60), "yellow": (240, 200, 40),
    "pink": (240, 130, 180), "purple": (120, 60, 160), "white": (245, 245, 245),
    "black": (40, 40, 45), "orange": (240, 130, 30), "brown": (120, 80, 40), "grey": (130, 130, 135),
}
# garment -> (main piece, secondary piece or None); the pattern goes on the main piece
GARMENTS = {
    "dress": ("dress", None),
    "shirt_skirt": ("skirt", "shirt"),
    "hoodie_shorts": ("hoodie", "shorts"),
    "kimono": ("kimono", "sash"),
}
PATTERNS = {"solid": None, "stripes": "striped", "dots": "polka_dot", "checks": "plaid"}
ARMS = {"down": "arms_at_sides", "up": "arms_up", "hips": "hands_on_hips", "wave": "waving",
        "out": "outstretched_arms"}
LEGS = {"together": "standing", "apart": "legs_apart", "walking": "walking"}
LEANS = (-12.0, 0.0, 12.0)
BACKGROUNDS = ("flat", "gradient", "scenery")
# framing -> probability; the odd framings are a small share, as in Danbooru
FRAMINGS = {"full": 0.76, "closeup": 0.14, "upside_down": 0.05, "low_head": 0.05}
BG_COLORS = {
    "white": (255, 255, 255), "cream": (250, 240, 215), "sky": (200, 225, 250),
    "mint": (205, 240, 220), "lilac": (225, 210, 245), "peach": (252, 215, 200),
    "grey": (215, 215, 220), "lemon": (250, 245, 190),
}
SKIN = (255, 226, 204)


@dataclass(frozen=True)
class Scene:
    """How pictures are framed: the distributions ``render`` draws framing, background, figure
    height (as a share of the picture side), lean and horizontal head position from."""

    framings: dict[str, float]
    backgrounds: tuple[str, ...]
    figure_height: tuple[float, float]
    leans: tuple[float, ...]
    head_x: tuple[float, float]
    # features drawn for a 16 x 16 latent: the garments' patterns at least an eighth of the picture side per period
    # (two latent cells) and the eyes' pupils a small dot, so that the iris's colour fills most of the eye
    bold: bool = False


# "danbooru": the full variety (odd framings, scenery, small figures), as the detector and the data
# tools need it. "demo": every picture a large, upright full figure on a flat background, so that the
# demo family's tiny models can learn identity (what the papers are about) rather than layout within
# a CPU budget (what the demo family trained on up to v10). "demo-cowboy": the same, framed from the head to
# the thighs (a figure taller than the picture is placed with its top 2 to 3 % below the picture's), so
# that a 64 px picture draws its eyes and patterns about 1.5 times as large: what it trains on since v11.
SCENES = {
    "danbooru": Scene(FRAMINGS, BACKGROUNDS, (0.62, 0.95), LEANS, (0.3, 0.7)),
    "demo": Scene({"full": 1.0}, ("flat",), (0.9, 0.98), (0.0,), (0.42, 0.58)),
    "demo-cowboy": Scene({"full": 1.0}, ("flat",), (1.35, 1.45), (0.0,), (0.42, 0.58)),
    # "demo-bold": the cowboy shots with bold features. At 64 px the cowboy shots' patterns repeat every 4 pixels,
    # one cell of a 16 x 16 latent, and their pupils cover most of a 4-pixel eye: the demo family's autoencoder
    # keeps the pattern on 39 % of its reconstructions and the eye colour on 71 % (v13's REPORT.md). The same
    # characters, outfits, poses and random draws, only patterns and pupils drawn differently.
    "demo-bold": Scene({"full": 1.0}, ("flat",), (1.35, 1.45), (0.0,), (0.42, 0.58), bold=True),
}
_BINARY = [0] * 128 + [255] * 128  # threshold look-up table for masks


@dataclass(frozen=True)
class Artist:
    """A drawing style: what stays fixed for every picture an artist draws."""

    name: str
    line_width: float  # outline width in figure units (a figure is 200 units tall)
    shading: str  # "none" | "cel" (hard shadow on one side) | "soft" (horizontal ramp)
    saturation: float  # multiplier on the HSV saturation of every colour
    line_color: tuple[int, int, int]


ARTISTS = (
    Artist("artist_ink", 3.0, "none", 1.0, (20, 20, 25)),
    Artist("artist_cel", 2.0, "cel", 1.15, (60, 35, 30)),
    Artist("artist_pastel", 1.2, "soft", 0.55, (90, 80, 110)),
    Artist("artist_bold", 4.5, "cel", 1.3, (0, 0, 0)),
)


@dataclass(frozen=True)
class Outfit:
    garment: str  # a key of GARMENTS
    color: str  # main piece colour, a key of CLOTH_COLORS
    secondary_color: str  # secondary piece colour
    pattern: str  # a key of PATTERNS


@dataclass(frozen=True)
class Character:
    name: str
    hair_color: str
    hair_style: str
    eye_color: str
    outfits: tuple[Outfit, ...]
    artists: tuple[str, ...]
    split: str  # "train" characters also have test clusters; "test" characters only test


@dataclass(frozen=True)
class Cluster:
    character: Character
    artist: Artist
    outfit_index: int
    split: str

    @property
    def outfit(self) -> Outfit:
        return self.character.outfits[self.outfit_index]

    @property
    def key(self) -> str:
        return f"{self.character.name}/{self.artist.name}/outfit{self.outfit_index}"


# --------------------------------------------------------------------------- world building

_SYLLABLES = ("a", "ka", "ki", "mi", "na", "ri", "sa", "to", "yu", "ha", "ne", "ko", "ru", "shi",
              "ma", "no", "e", "ra", "chi", "hi")


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        given = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        family = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        name = f"{given}_{family}"
        if name not in taken:
            taken.add(name)
            return name


def _outfit(rng: random.Random, taken: set[Outfit]) -> Outfit:
    while True:
        color, secondary = rng.sample(sorted(CLOTH_COLORS), 2)
        outfit = Outfit(rng.choice(sorted(GARMENTS)), color, secondary, rng.choice(sorted(PATTERNS)))
        if outfit not in taken:
            taken.add(outfit)
            return outfit


def build_world(num_images: int, seed: int, images_per_cluster: int = 6) -> list[Cluster]:
    """Characters, their outfits and artists, and the clusters the pictures are spread over.

    About ``num_images / images_per_cluster`` clusters; every character has 2 to 4 outfits and
    is drawn by 1 or 2 artists. Every fifth character (and the last one, when there are fewer
    than five) is a ``test`` character, never seen in training (the papers' out-of-domain
    characters); train characters with three or more clusters give one of them to ``test``
    half of the time (in-domain evaluation).
    """
    rng = random.Random(f"toybooru-world/{seed}")
    wanted = max(4, round(num_images / images_per_cluster))
    characters: list[Character] = []
    names: set[str] = set()
    looks: set[tuple[str, str, str]] = set()
    total = 0
    while total < wanted:
        remaining = wanted - total
        n_outfits = max(2, min(rng.randint(2, 4), remaining))
        n_artists = 2 if (rng.random() < 0.35 and 2 * n_outfits <= remaining) else 1
        while True:
            look = (rng.choice(sorted(HAIR_COLORS)), rng.choice(HAIR_STYLES), rng.choice(sorted(EYE_COLORS)))
            if look not in looks:
                looks.add(look)
                break
        taken: set[Outfit] = set()
        outfits = tuple(_outfit(rng, taken) for _ in range(n_outfits))
        artists = tuple(a.name for a in rng.sample(ARTISTS, n_artists))
        characters.append(Character(_name(rng, names), *look, outfits, artists, "train"))
        total += n_outfits * n_artists
    test_ids = {i for i in range(len(characters)) if i % 5 == 4} or {len(characters) - 1}
    by_name = {a.name: a for a in ARTISTS}
    clusters: list[Cluster] = []
    for i, char in enumerate(characters):
        if i in test_ids:
            char = replace(char, split="test")
        own = [Cluster(char, by_name[a], o, char.split) for a in char.artists for o in range(len(char.outfits))]
        if char.split == "train" and len(own) >= 3 and rng.random() < 0.5:
            k = rng.randrange(len(own))
            own[k] = Cluster(char, own[k].artist, own[k].outfit_index, "test")
        clusters.extend(own)
    return clusters


# --------------------------------------------------------------------------- drawing

def _style(rgb: tuple[int, int, int], saturation: float) -> tuple[int, int, int]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb(h, min(1.0, s * saturation), v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _darker(rgb: tuple[int, int, int], f: float = 0.72) -> tuple[int, int, int]:
    return tuple(round(c * f) for c in rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class Pose:
    arms: str
    legs: str
    lean: float


# arm end points in figure units (the figure is 100 x 200 units; (0, 0) is its top left);
# each arm is shoulder -> elbow -> hand
_SHOULDERS = ((34.0, 66.0), (66.0, 66.0))
_ARMS = {
    "down": (((29, 90), (27, 113)), ((71, 90), (73, 113))),
    "up": (((24, 44), (20, 18)), ((76, 44), (80, 18))),
    "hips": (((16, 86), (37, 104)), ((84, 86), (63, 104))),
    "wave": (((29, 90), (27, 113)), ((84, 50), (82, 24))),
    "out": (((12, 68), (-8, 70)), ((88, 68), (108, 70))),
}
_HIPS = ((43.0, 124.0), (57.0, 124.0))
_LEGS = {
    "together": (((44, 160), (44, 194)), ((56, 160), (56, 194))),
    "apart": (((36, 160), (28, 194)), ((64, 160), (72, 194))),
    "walking": (((40, 160), (34, 192)), ((60, 156), (68, 186))),
}
# where the head box lies, in figure units: the hair cap and the face
HEAD_BOX = (26.0, 4.0, 74.0, 57.0)
_PAD = (20.0, 10.0)  # layer margin so that outstretched arms and tails fit
_LAYER = (140.0, 215.0)


class _Canvas:
    """Draws in figure units on an RGBA layer plus an L head mask of the same geometry."""

    def __init__(self, k: float, artist: Artist, min_step: float = 3.0):
        self.k = k
        self.min_step = min_step  # the patterns' shortest period, in this layer's pixels
        self.size = (max(1, round(_LAYER[0] * k)), max(1, round(_LAYER[1] * k)))
        self.rgba = Image.new("RGBA", self.size, (0, 0, 0, 0))
        self.head = Image.new("L", self.size, 0)
        self.draw = ImageDraw.Draw(self.rgba)
        self.hdraw = ImageDraw.Draw(self.head)
        self.lw = max(1, round(artist.line_width * k))
        self.line = artist.line_color + (255,)

    def p(self, x: float, y: float) -> tuple[float, float]:
        return ((x + _PAD[0]) * self.k, (y + _PAD[1]) * self.k)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.p(x0, y0), *self.p(x1, y1)]

    def poly(self, pts, fill, outline: bool = True) -> None:
        self.draw.polygon([self.p(*q) for q in pts], fill=fill + (255,),
                          outline=self.line if outline else None, width=self.lw if outline else 1)

    def ellipse(self, box, fill, outline: bool = True) -> None:
        self.draw.ellipse(self.box(*box), fill=fill + (255,),
                          outline=self.line if outline else None, width=self.lw if outline else 1)

    def limb(self, pts, width: float, fill) -> None:
        xy = [self.p(*q) for q in pts]
        w = max(1, round(width * self.k))
        self.draw.line(xy, fill=self.line, width=w + 2 * self.lw, joint="curve")
        self.draw.line(xy, fill=fill + (255,), width=w, joint="curve")
        r = (w + 2 * self.lw) / 2
        for x, y in xy[-1:]:
            self.draw.ellipse([x - r, y - r, x + r, y + r], fill=self.line)
            self.draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=fill + (255,))

    def patterned(self, pts, color, pattern: str, rng: random.Random) -> None:
        """A garment polygon filled with ``pattern`` in a darker or lighter tone of ``color``."""
        self.poly(pts, color)
        if pattern == "solid":
            return
        xs = [self.p(*q)[0] for q in pts]
        ys = [self.p(*q)[1] for q in pts]
        x0, y0, x1, y1 = int(min(xs)), int(min(ys)), int(math.ceil(max(xs))) + 1, int(math.ceil(max(ys))) + 1
        region = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(region).polygon([(x - x0, y - y0) for x, y in zip(xs, ys)], fill=255)
        motif = Image.new("L", region.size, 0)
        md = ImageDraw.Draw(motif)
        step = max(self.min_step, 9.0 * self.k)
        if pattern == "stripes":
            w = max(1, round(step * 0.4))
            y = rng.uniform(0, step)
            while y < region.size[1]:
                md.line([(0, y), (region.size[0], y)], fill=255, width=w)
                y += step
        elif pattern == "dots":
            r = max(1.0, step * 0.22)
            for j in range(int(region.size[1] / step) + 2):
                for i in range(int(region.size[0] / step) + 2):
                    cx, cy = (i + 0.5 * (j % 2)) * step, j * step
                    md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:  # checks
            s = int(step)
            for j in range(region.size[1] // s + 1):
                for i in range(region.size[0] // s + 1):
                    if (i + j) % 2 == 0:
                        md.rectangle([i * s, j * s, i * s + s - 1, j * s + s - 1], fill=255)
        motif = ImageChops.multiply(motif, region)
        tone = _darker(color, 0.6) if sum(color) > 200 else tuple(min(255, c + 90) for c in color)
        self.rgba.paste(tone + (255,), (x0, y0), motif)
        self.draw.polygon([self.p(*q) for q in pts], outline=self.line, width=self.lw)


def _draw_figure(canvas: _Canvas, char: Character, outfit: Outfit, artist: Artist, pose: Pose,
                 rng: random.Random, bold: bool = False) -> None:
    sat = artist.saturation
    hair = _style(HAIR_COLORS[char.hair_color], sat)
    eyes = _style(EYE_COLORS[char.eye_color], sat)
    main = _style(CLOTH_COLORS[outfit.color], sat)
    second = _style(CLOTH_COLORS[outfit.secondary_color], sat)
    skin = _style(SKIN, sat)
    c = canvas

    # back hair
    if char.hair_style == "long":
        c.poly([(27, 22), (73, 22), (80, 112), (20, 112)], hair)
    elif char.hair_style == "twintails":
        c.poly([(28, 18), (18, 16), (4, 60), (10, 118), (24, 70)], hair)
        c.poly([(72, 18), (82, 16), (96, 60), (90, 118), (76, 70)], hair)
    elif char.hair_style == "ponytail":
        c.poly([(60, 8), (86, 14), (92, 50), (84, 104), (74, 60), (70, 22)], hair)
    elif char.hair_style == "bob":
        c.poly([(25, 20), (75, 20), (78, 62), (22, 62)], hair)
    if outfit.garment == "hoodie_shorts":
        c.ellipse((28, 46, 72, 74), main)  # hood behind the neck

    # legs and shoes
    for hip, (knee, foot) in zip(_HIPS, _LEGS[pose.legs]):
        c.limb([hip, knee, foot], 11, skin)
        c.ellipse((foot[0] - 7, foot[1] - 3, foot[0] + 7, foot[1] + 5), _darker(second, 0.6))

    # garment
    if outfit.garment == "dress":
        c.patterned([(34, 62), (66, 62), (62, 104), (78, 166), (22, 166), (38, 104)], main, outfit.pattern, rng)
    elif outfit.garment == "shirt_skirt":
        c.poly([(33, 62), (67, 62), (64, 114), (36, 114)], second)
        c.patterned([(37, 108), (63, 108), (76, 150), (24, 150)], main, outfit.pattern, rng)
    elif outfit.garment == "hoodie_shorts":
        c.poly([(34, 120), (66, 120), (69, 146), (52, 146), (50, 136), (48, 146), (31, 146)], second)
        c.patterned([(32, 62), (68, 62), (67, 126), (33, 126)], main, outfit.pattern, rng)
    else:  # kimono
        c.patterned([(33, 62), (67, 62), (70, 186), (30, 186)], main, outfit.pattern, rng)
        c.poly([(35, 96), (65, 96), (66, 112), (34, 112)], second)

    # arms; long sleeves for hoodies and kimonos, bare arms otherwise
    sleeve = outfit.garment in ("hoodie_shorts", "kimono")
    for shoulder, (elbow, hand) in zip(_SHOULDERS, _ARMS[pose.arms]):
        c.limb([shoulder, elbow, hand], 9, skin)
        if sleeve:
            c.limb([shoulder, elbow], 13 if outfit.garment == "kimono" else 11, main)
        else:
            sx, sy = shoulder
            ex, ey = elbow
            c.limb([shoulder, (sx + (ex - sx) * 0.3, sy + (ey - sy) * 0.3)], 12,
                   main if outfit.garment == "dress" else second)

    # neck, hair cap, face, eyes, bangs
    c.poly([(46, 50), (54, 50), (54, 63), (46, 63)], skin, outline=False)
    c.ellipse((26, 4, 74, 48), hair)
    c.ellipse((30, 16, 70, 57), skin)
    for ex in (41, 59):
        c.ellipse((ex - 5, 30, ex + 5, 43), (255, 255, 255), outline=False)
        c.ellipse((ex - 4, 32, ex + 4, 43), eyes, outline=False)
        if bold:  # a dot: the iris's colour fills the eye
            c.ellipse((ex - 1, 37, ex + 1, 40), (20, 15, 25), outline=False)
        else:
            c.ellipse((ex - 2, 35, ex + 2, 41), (20, 15, 25), outline=False)
        c.ellipse((ex - 3, 32, ex - 0.5, 35), (255, 255, 255), outline=False)
    c.draw.line([c.p(47, 49), c.p(53, 49)], fill=c.line, width=max(1, c.lw // 2 + 1))
    c.poly([(28, 30), (31, 12), (50, 6), (69, 12), (72, 30), (64, 21), (57, 28), (50, 18), (43, 28), (36, 21)], hair)
    if char.hair_style in ("long", "bob"):
        c.poly([(27, 24), (33, 24), (32, 60), (26, 56)], hair)
        c.poly([(73, 24), (67, 24), (68, 60), (74, 56)], hair)

    # the head box: hair cap and face
    c.hdraw.ellipse(c.box(26, 4, 74, 48), fill=255)
    c.hdraw.ellipse(c.box(30, 16, 70, 57), fill=255)
    c.hdraw.rectangle(c.box(30, 26, 70, 48), fill=255)

    # shading, in the artist's manner
    if artist.shading != "none":
        alpha = c.rgba.getchannel("A")
        w = c.size[0]
        if artist.shading == "cel":  # a hard shadow on the right 40 % of the layer
            row = bytes(70 if x > 0.6 * w else 0 for x in range(w))
        else:  # a soft ramp from nothing on the left to 35 % on the right
            row = bytes(x * 90 // w for x in range(w))
        ramp = Image.frombytes("L", (w, 1), row).resize(c.size, Image.Resampling.NEAREST)
        shade = ImageChops.multiply(ramp, alpha)
        dark = Image.new("RGBA", c.size, (30, 20, 60, 255))
        c.rgba = Image.composite(dark, c.rgba, shade)
        c.rgba.putalpha(alpha)


def _background(size: int, rng: random.Random, kind: str) -> tuple[Image.Image, list[str], dict]:
    if kind == "flat":
        name = rng.choice(sorted(BG_COLORS))
        img = Image.new("RGB", (size, size), BG_COLORS[name])
        tags = ["simple_background"] + (["white_background"] if name == "white" else [])
        return img, tags, {"kind": kind, "color": name}
    if kind == "gradient":
        a, b = rng.sample(sorted(BG_COLORS), 2)
        ramp = Image.linear_gradient("L").resize((size, size))
        img = Image.composite(Image.new("RGB", (size, size), BG_COLORS[a]),
                              Image.new("RGB", (size, size), BG_COLORS[b]), ramp)
        return img, ["gradient_background"], {"kind": kind, "colors": [a, b]}
    horizon = rng.uniform(0.55, 0.8)
    ground = rng.choice(["grass", "sand"])
    ramp = Image.linear_gradient("L").resize((size, size))
    img = Image.composite(Image.new("RGB", (size, size), (250, 250, 255)),
                          Image.new("RGB", (size, size), (110, 170, 235)), ramp)
    d = ImageDraw.Draw(img)
    s = size
    extras = []
    if rng.random() < 0.5:
        cx, cy, r = rng.uniform(0.1, 0.9) * s, rng.uniform(0.05, 0.3) * s, 0.07 * s
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 236, 150))
        extras.append("sun")
    if rng.random() < 0.5:
        cx, cy = rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.35) * s
        for dx in (-0.06, 0.0, 0.06):
            d.ellipse([cx + (dx - 0.06) * s, cy - 0.035 * s, cx + (dx + 0.06) * s, cy + 0.035 * s],
                      fill=(255, 255, 255))
        extras.append("cloud")
    gcol = (120, 190, 90) if ground == "grass" else (232, 210, 160)
    d.rectangle([0, horizon * s, s, s], fill=gcol)
    if rng.random() < 0.5:
        tx = rng.uniform(0.05, 0.95) * s
        d.rectangle([tx - 0.025 * s, (horizon - 0.18) * s, tx + 0.025 * s, (horizon + 0.02) * s], fill=(110, 75, 45))
        d.ellipse([tx - 0.1 * s, (horizon - 0.34) * s, tx + 0.1 * s, (horizon - 0.12) * s], fill=(60, 140, 70))
        extras.append("tree")
    tags = ["outdoors", "sky", ground] + [e for e in extras if e in ("tree", "cloud")]
    return img, tags, {"kind": kind, "horizon": round(horizon, 4), "ground": ground, "extras": extras}


def _choose(rng: random.Random, table: dict[str, float]) -> str:
    x, acc = rng.random(), 0.0
    for key, p in table.items():
        acc += p
        if x < acc:
            return key
    return key


def render(cluster: Cluster, size: int, rng: random.Random, scene: Scene = SCENES["danbooru"]):
    """Draw one picture of ``cluster``: (image RGB, mask L 0/255, head box, tags, cloth tags, truth)."""
    char, artist, outfit = cluster.character, cluster.artist, cluster.outfit
    pose = Pose(rng.choice(sorted(ARMS)), rng.choice(sorted(LEGS)), rng.choice(scene.leans))
    framing = _choose(rng, scene.framings)
    flip = rng.random() < 0.5
    bg_kind = rng.choice(scene.backgrounds)
    image, bg_tags, bg_truth = _background(size, rng, bg_kind)

    if framing == "closeup":
        fig_h = rng.uniform(2.4, 3.4) * size  # the head is about a quarter of the figure
    else:
        fig_h = rng.uniform(*scene.figure_height) * size
    ss = 2 if fig_h < size else 1  # supersampling: small figures are drawn twice as large, then reduced
    k = fig_h / 200.0
    canvas = _Canvas(k * ss, artist, min_step=(size / 8 if scene.bold else 3.0) * ss)
    _draw_figure(canvas, char, outfit, artist, pose, rng, bold=scene.bold)
    layer, head = canvas.rgba, canvas.head
    if ss > 1:
        layer = layer.reduce(ss)
        head = head.reduce(ss)
    if flip:
        layer, head = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT), head.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = pose.lean + (180.0 if framing == "upside_down" else 0.0)
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        head = head.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)

    # place the layer: the head box centre goes where the framing wants it
    hb = head.getbbox() or (0, 0, 1, 1)
    hcx, hcy = (hb[0] + hb[2]) / 2, (hb[1] + hb[3]) / 2
    hh = hb[3] - hb[1]
    if framing == "closeup":
        target = (rng.uniform(0.4, 0.6) * size, rng.uniform(0.38, 0.62) * size)
    elif framing == "upside_down":
        target = (rng.uniform(0.3, 0.7) * size, size - hh / 2 - rng.uniform(0.02, 0.12) * size)
    elif framing == "low_head":
        target = (rng.uniform(0.25, 0.75) * size, size - hh / 2 - rng.uniform(0.0, 0.08) * size)
    else:
        fig = layer.getchannel("A").getbbox() or (0, 0, 1, 1)
        top_to_head = hcy - fig[1]
        lo, hi = 0.02 * size, max(0.03 * size, size - (fig[3] - fig[1]) * rng.uniform(0.85, 1.0))
        target = (rng.uniform(*scene.head_x) * size, rng.uniform(lo, hi) + top_to_head)
    ox, oy = round(target[0] - hcx), round(target[1] - hcy)

    image.paste(layer.convert("RGB"), (ox, oy), layer.getchannel("A"))
    mask = Image.new("L", (size, size), 0)
    mask.paste(layer.getchannel("A").point(_BINARY), (ox, oy))
    headmask = Image.new("L", (size, size), 0)
    headmask.paste(head.point(_BINARY), (ox, oy))
    face_bbox = list(headmask.getbbox() or (0, 0, 0, 0))

    garment_main, garment_second = GARMENTS[outfit.garment]
    cloth_tags = [f"{outfit.color}_{garment_main}"]
    if PATTERNS[outfit.pattern]:
        cloth_tags.append(f"{PATTERNS[outfit.pattern]}_{garment_main}")
    if garment_second:
        cloth_tags.append(f"{outfit.secondary_color}_{garment_second}")
    cloth_tags += [garment_main] + ([garment_second] if garment_second else [])
    shot = {"closeup": ["close-up", "portrait"], "upside_down": ["upside-down"],
            "low_head": ["peeking_out"]}.get(framing)
    if shot is None:
        fb = mask.getbbox() or (0, 0, 0, 0)
        shot = ["full_body"] if fb[3] < size and fb[1] > 0 else ["cowboy_shot"]
    tags = ["1girl", "solo", f"{char.hair_color}_hair", f"{char.hair_style}_hair"
            if char.hair_style in ("long", "short") else char.hair_style, f"{char.eye_color}_eyes"]
    tags += cloth_tags + [ARMS[pose.arms], LEGS[pose.legs]]
    if pose.lean:
        tags.append("leaning_to_the_side")
    tags += shot + bg_tags
    truth = {
        "hair_color": char.hair_color, "hair_style": char.hair_style, "eye_color": char.eye_color,
        "garment": outfit.garment, "cloth_color": outfit.color, "secondary_color": outfit.secondary_color,
        "pattern": outfit.pattern, "artist_style": asdict(artist), "pose": asdict(pose),
        "framing": framing, "flip": flip, "figure_height": round(fig_h, 3),
        "offset": [ox, oy], "background": bg_truth,
    }
    return image, mask, face_bbox, tags, cloth_tags, truth


# --------------------------------------------------------------------------- writing

def assign_images(clusters: list[Cluster], num_images: int, seed: int) -> list[Cluster]:
    """Which cluster each picture belongs to: sizes as equal as possible, order shuffled."""
    rng = random.Random(f"toybooru-assign/{seed}")
    order = [clusters[i % len(clusters)] for i in range(num_images)]
    rng.shuffle(order)
    return order


def generate(out: str | os.PathLike, num_images: int, seed: int = 0, size: int = 128,
             overwrite: bool = False, scene: str = "danbooru") -> Path:
    """Write a Toybooru data set to ``out`` and return its path; ``scene`` names one of ``SCENES``.

    Everything is written to a temporary folder beside ``out`` and moved into place at the end,
    so an interrupted run never leaves a half-written data set behind.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not 32 <= size <= 2048:
        raise ValueError(f"size must be between 32 and 2048 pixels, got {size}")
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; expected one of {', '.join(SCENES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / "annotations.jsonl").exists():
            raise FileExistsError(f"{out} is not a Toybooru folder (no annotations.jsonl); refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing_folder(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        clusters = build_world(num_images, seed)
        members = assign_images(clusters, num_images, seed)
        ids = [f"tb{seed:04d}_{i:06d}" for i in range(num_images)]
        by_cluster: dict[str, list[str]] = {}
        for pid, cl in zip(ids, members):
            by_cluster.setdefault(cl.key, []).append(pid)
        records = []
        for i, (pid, cl) in enumerate(zip(ids, members)):
            rng = random.Random(f"toybooru-image/{seed}/{i}")
            image, mask, face_bbox, tags, cloth_tags, truth = render(cl, size, rng, SCENES[scene])
            image.save(tmp / "images" / f"{pid}.png", compress_level=1)
            mask.save(tmp / "masks" / f"{pid}.png", compress_level=1)
            records.append({
                "id": pid, "file": f"images/{pid}.png", "mask_file": f"masks/{pid}.png",
                "width": size, "height": size, "split": cl.split,
                "character": cl.character.name, "artist": cl.artist.name,
                "outfit": f"{cl.character.name}/outfit{cl.outfit_index}", "cluster": cl.key,
                "tags": tags, "cloth_tags": cloth_tags,
                "face_bbox": face_bbox,
                "similar": [o for o in by_cluster[cl.key] if o != pid],
                "truth": truth,
            })
        with open(tmp / "annotations.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=False) + "\n")
        info = {
            "generator": "toybooru", "version": GENERATOR_VERSION,
            "args": {"num_images": num_images, "seed": seed, "size": size, "scene": scene},
            "num_clusters": len(by_cluster),
            "characters": sorted({(c.character.name, c.character.split) for c in clusters}),
            "splits": {s: sum(r["split"] == s for r in records) for s in ("train", "test")},
        }
        (tmp / "toybooru.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.data.toybooru", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (images/, masks/, annotations.jsonl)")
    p.add_argument("--num-images", type=int, default=1000, help="number of pictures")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    p.add_argument("--size", type=int, default=128, help="picture side in pixels (square)")
    p.add_argument("--scene", choices=sorted(SCENES), default="danbooru",
                   help="framing: 'danbooru' (every framing and background), 'demo' (large upright full figures "
                        "on flat backgrounds) or 'demo-cowboy' (upright cowboy shots on flat backgrounds, what the "
                        "demo family is trained on)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Toybooru folder")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    t0 = time.perf_counter()
    out = generate(args.out, args.num_images, args.seed, args.size, overwrite=args.overwrite,
                   scene=args.scene)
    dt = time.perf_counter() - t0
    print(f"wrote {args.num_images} pictures to {out} in {dt:.1f} s ({args.num_images / dt:.0f} pictures/s)")
    return out


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
