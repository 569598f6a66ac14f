"""The demo's synthetic world: coloured shapes on varied backgrounds, captioned by a small grammar.

Deterministic: the same `DemoDataConfig` (seed) gives the same image bytes and captions. Each
sample records its object words (the shape nouns) and whether its caption was deliberately
swapped for another image's caption (`is_mismatched`), so later stages can be scored against
known noise. Broken URLs of every kind a crawler meets are added by `demo_url_rows`.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vlpdist.config import DemoDataConfig

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
}
# Horizontal slots, left to right; the caption grammar talks about this order.
SLOT_NAMES = ("left", "center", "right")

# Broken URL kinds and the failure reason the ingestion summary must file them under.
# img2dataset reports an HTML page and a cut-off JPEG alike ("Image decoding error"): it never
# looks at the Content-Type, so both land under decode_error.
BROKEN_KINDS = {
    "http_404": "http_404",
    "http_500": "http_500",
    "html": "decode_error",
    "truncated": "decode_error",
    "empty": "empty_body",
    "slow": "timeout",
}


@dataclass(frozen=True)
class DemoSample:
    """One generated image with its (possibly mismatched) caption and ground truth."""

    path: str  # URL path on the demo server, e.g. "img/000042.jpg"
    jpeg: bytes
    caption: str  # what the URL list says (the web caption)
    true_caption: str  # what the image really shows
    object_words: tuple[str, ...]  # shape nouns visible in the image
    is_mismatched: bool


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "star":
        r_out, r_in = (x1 - x0) / 2, (x1 - x0) / 5
        points = []
        for i in range(10):
            angle = math.pi / 2 + i * math.pi / 5
            r = r_out if i % 2 == 0 else r_in
            points.append((cx + r * math.cos(angle), cy - r * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape}")


def _background(rng: random.Random, size: int) -> Image.Image:
    """A light background: flat, vertical gradient or speckled, so images are not trivially alike."""
    base = tuple(rng.randint(170, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), base)
    style = rng.choice(("flat", "gradient", "speckle"))
    draw = ImageDraw.Draw(image)
    if style == "gradient":
        other = tuple(rng.randint(170, 250) for _ in range(3))
        for y in range(size):
            t = y / max(size - 1, 1)
            draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif style == "speckle":
        for _ in range(size * 2):
            x, y = rng.randrange(size), rng.randrange(size)
            draw.point((x, y), fill=tuple(max(0, c - rng.randint(20, 60)) for c in base))
    return image


def _caption(objects: list[tuple[str, str]]) -> str:
    """Grammar over objects sorted left to right: ('red', 'circle'), ... -> English."""
    phrases = [f"a {color} {shape}" for color, shape in objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} left of {phrases[1]}"
    return f"{phrases[0]}, {phrases[1]} and {phrases[2]} from left to right"


def _render(rng: random.Random, size: int) -> tuple[bytes, str, tuple[str, ...]]:
    n_objects = rng.randint(1, 3)
    slots = sorted(rng.sample(range(len(SLOT_NAMES)), n_objects))
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    objects = []
    slot_width = size / len(SLOT_NAMES)
    for slot in slots:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        side = rng.uniform(0.55, 0.85) * slot_width
        x0 = slot * slot_width + rng.uniform(0, slot_width - side)
        y0 = rng.uniform(0.1 * size, 0.9 * size - side)
        _draw_shape(draw, shape, (int(x0), int(y0), int(x0 + side), int(y0 + side)), COLORS[color])
        objects.append((color, shape))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), _caption(objects), tuple(shape for _, shape in objects)


def generate_demo_samples(config: DemoDataConfig) -> list[DemoSample]:
    """The good samples, in order. A `mismatch_fraction` of them carry another sample's caption."""
    rng = random.Random(config.seed)
    rendered = [_render(rng, config.image_size) for _ in range(config.num_samples)]
    n_mismatched = round(config.mismatch_fraction * config.num_samples)
    mismatched = set(rng.sample(range(config.num_samples), n_mismatched))
    samples = []
    for index, (jpeg, true_caption, words) in enumerate(rendered):
        caption = true_caption
        if index in mismatched:
            # Another image's caption that really differs (web noise, not a duplicate).
            while True:
                donor = rendered[rng.randrange(config.num_samples)]
                if donor[1] != true_caption and set(donor[2]) != set(words):
                    caption = donor[1]
                    break
        samples.append(
            DemoSample(
                path=f"img/{index:06d}.jpg",
                jpeg=jpeg,
                caption=caption,
                true_caption=true_caption,
                object_words=words,
                is_mismatched=index in mismatched,
            )
        )
    return samples


def broken_paths(config: DemoDataConfig) -> dict[str, str]:
    """URL path -> broken kind, `broken_per_kind` of each kind. The server decides by prefix."""
    return {
        f"broken/{kind}/{i:03d}.jpg": kind for kind in BROKEN_KINDS for i in range(config.broken_per_kind)
    }


def demo_url_rows(samples: list[DemoSample], config: DemoDataConfig, base_url: str) -> list[dict]:
    """Rows of the URL list (url, caption, plus ground truth) with broken URLs interleaved."""
    rows = [
        {
            "url": f"{base_url}/{s.path}",
            "caption": s.caption,
            "true_caption": s.true_caption,
            "object_words": " ".join(s.object_words),
            "is_mismatched": s.is_mismatched,
            "expected": "success",
        }
        for s in samples
    ]
    rng = random.Random(config.seed + 1)
    for path, kind in broken_paths(config).items():
        row = {
            "url": f"{base_url}/{path}",
            "caption": f"a broken link of kind {kind}",
            "true_caption": "",
            "object_words": "",
            "is_mismatched": False,
            "expected": BROKEN_KINDS[kind],
        }
        rows.insert(rng.randrange(len(rows) + 1), row)
    return rows
