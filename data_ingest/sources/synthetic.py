"""The demo's synthetic world: 1-4 coloured objects of 22 kinds in a row on varied backgrounds,
captioned by a small grammar, with one question about each scene answered by 10 noisy annotators.

Deterministic: the same `DemoDataConfig` (seed) gives the same image bytes, captions and
questions. Each sample records its objects left to right, its object words (the shape nouns the
label stage extracts with the `demo_shapes` vocabulary), and whether its caption was deliberately
swapped for another image's caption (`is_mismatched`), so later stages can be scored against known
noise. With 22 object classes and 1-4 objects an image, about a fifth of random pairs share a label
(with the earlier 5 shapes almost all did), so label-sharing positives (SupCon) carry information.

The question (VQAv2 style: question, 10 answers, question_type, answer_type) is about the image as
it is, whatever its caption says: the colour of an object, a count, what is left or right of an
object, or whether an object is there. Each of the 10 annotators answers wrongly with probability
`ANSWER_NOISE` (a plausible wrong answer of the same kind), and writes a correct count as a word
("two") with probability `NUMBER_AS_WORD`, a spelling the VQA normalisation maps back to "2".
Broken URLs of every kind a crawler meets are added by `demo_url_rows`.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vlpdist.config import DemoDataConfig

# Polygons of the shapes drawn as one polygon, in unit-box coordinates (x right, y down).
_UNIT_POLYGONS = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "cross": [(0.33, 0.0), (0.67, 0.0), (0.67, 0.33), (1.0, 0.33), (1.0, 0.67), (0.67, 0.67), (0.67, 1.0),
              (0.33, 1.0), (0.33, 0.67), (0.0, 0.67), (0.0, 0.33), (0.33, 0.33)],
    "arrow": [(0.0, 0.38), (0.5, 0.38), (0.5, 0.12), (1.0, 0.5), (0.5, 0.88), (0.5, 0.62), (0.0, 0.62)],
    "bar": [(0.0, 0.35), (1.0, 0.35), (1.0, 0.65), (0.0, 0.65)],
    "pillar": [(0.35, 0.0), (0.65, 0.0), (0.65, 1.0), (0.35, 1.0)],
    "trapezoid": [(0.25, 0.2), (0.75, 0.2), (1.0, 0.8), (0.0, 0.8)],
    "chevron": [(0.0, 1.0), (0.5, 0.0), (1.0, 1.0), (0.7, 1.0), (0.5, 0.5), (0.3, 1.0)],
    "bolt": [(0.55, 0.0), (0.15, 0.55), (0.45, 0.55), (0.3, 1.0), (0.85, 0.4), (0.55, 0.4), (0.8, 0.0)],
}
# The object classes (label words). The first five keep their ids in the `demo_shapes` vocabulary.
SHAPES = ("circle", "square", "triangle", "star", "diamond", "heart", "cross", "hexagon", "pentagon", "moon",
          "arrow", "bar", "pillar", "oval", "trapezoid", "dome", "hourglass", "bowtie", "frame", "donut",
          "chevron", "bolt")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
    "black": (30, 30, 30),
    "pink": (250, 110, 190),
}
MAX_OBJECTS = 4

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

# The question-answer columns of the URL list (the QA data contract of issue 18), in order.
QUESTION_COLUMNS = ("question", "answers", "question_type", "answer_type")
ANSWERS_PER_QUESTION = 10
ANSWER_NOISE = 0.1
"""Probability that one annotator gives a wrong answer (of the question's kind)."""
NUMBER_AS_WORD = 0.2
"""Probability that one annotator writes a correct count as a word ("two" for "2")."""
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
QUESTION_KINDS = ("color", "count", "relation", "existence")


@dataclass(frozen=True)
class DemoQuestion:
    """One question about a scene: VQAv2's fields, plus the noise-free answer and the kind asked."""

    question: str
    answers: tuple[str, ...]  # ANSWERS_PER_QUESTION annotators' answers, noise included
    question_type: str  # VQAv2-style question prefix, e.g. "what color is the"
    answer_type: str  # "yes/no", "number" or "other"
    true_answer: str
    kind: str  # one of QUESTION_KINDS


@dataclass(frozen=True)
class DemoSample:
    """One generated image with its (possibly mismatched) caption, its question and ground truth."""

    path: str  # URL path on the demo server, e.g. "img/000042.jpg"
    jpeg: bytes
    caption: str  # what the URL list says (the web caption)
    true_caption: str  # what the image really shows
    objects: tuple[tuple[str, str], ...]  # (colour, shape) of each object, left to right
    object_words: tuple[str, ...]  # shape nouns visible in the image, left to right
    is_mismatched: bool
    question: DemoQuestion  # about the image, whatever its caption says


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    at = lambda u, v: (x0 + u * w, y0 + v * h)  # noqa: E731  (unit box -> pixels)
    ring_width = max(2, round(w / 5))
    if shape in _UNIT_POLYGONS:
        draw.polygon([at(u, v) for u, v in _UNIT_POLYGONS[shape]], fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "oval":
        draw.ellipse((x0, y0 + h / 5, x1, y1 - h / 5), fill=fill)
    elif shape == "donut":
        draw.ellipse(box, outline=fill, width=ring_width)
    elif shape == "frame":
        draw.rectangle(box, outline=fill, width=ring_width)
    elif shape in ("hexagon", "pentagon"):
        draw.regular_polygon((cx, cy, w / 2), 6 if shape == "hexagon" else 5, fill=fill)
    elif shape == "dome":
        draw.pieslice((x0, y0 + h / 4, x1, y1 + h / 4), 180, 360, fill=fill)
    elif shape == "hourglass":
        draw.polygon([at(0, 0), at(1, 0), at(0.5, 0.5)], fill=fill)
        draw.polygon([at(0, 1), at(1, 1), at(0.5, 0.5)], fill=fill)
    elif shape == "bowtie":
        draw.polygon([at(0, 0), at(0.5, 0.5), at(0, 1)], fill=fill)
        draw.polygon([at(1, 0), at(0.5, 0.5), at(1, 1)], fill=fill)
    elif shape == "heart":
        draw.ellipse((x0, y0, cx + w * 0.02, cy), fill=fill)
        draw.ellipse((cx - w * 0.02, y0, x1, cy), fill=fill)
        draw.polygon([at(0.02, 0.32), at(0.98, 0.32), at(0.5, 1.0)], fill=fill)
    elif shape == "moon":
        # A crescent opening right: the left half of a circle minus a narrower half-ellipse.
        outer = [(cx - w / 2 * math.sin(t), cy - h / 2 * math.cos(t)) for t in (i * math.pi / 12 for i in range(13))]
        inner = [(cx - w / 10 * math.sin(t), cy - h / 2 * math.cos(t)) for t in (i * math.pi / 12 for i in range(12, -1, -1))]
        draw.polygon(outer + inner, fill=fill)
    elif shape == "star":
        r_out, r_in = w / 2, w / 5
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


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" or word == "hourglass" else "a"


def _phrase(color: str, shape: str) -> str:
    return f"{_article(color)} {color} {shape}"


def scene_caption(objects: tuple[tuple[str, str], ...]) -> str:
    """Grammar over objects left to right: (('red', 'circle'), ...) -> English."""
    phrases = [_phrase(color, shape) for color, shape in objects]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} left of {phrases[1]}"
    return f"{', '.join(phrases[:-1])} and {phrases[-1]} from left to right"


def sample_scene(rng: random.Random) -> tuple[tuple[str, str], ...]:
    """1-4 objects, each of a uniformly drawn colour and shape (repeats allowed), left to right."""
    return tuple((rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(rng.randint(1, MAX_OBJECTS)))


def _render(rng: random.Random, size: int, objects: tuple[tuple[str, str], ...]) -> bytes:
    """The objects in equal columns, left to right: one object may fill most of the image, four share it."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    column = size / len(objects)
    for index, (color, shape) in enumerate(objects):
        side = rng.uniform(0.6, 0.9) * min(column, 0.7 * size)
        x0 = index * column + rng.uniform(0, column - side)
        y0 = rng.uniform(0.08 * size, 0.92 * size - side)
        _draw_shape(draw, shape, (int(x0), int(y0), int(x0 + side), int(y0 + side)), COLORS[color])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _unique(items: list) -> list[int]:
    """Indices of the items that occur once."""
    return [i for i, item in enumerate(items) if items.count(item) == 1]


def _ask(rng: random.Random, objects: tuple[tuple[str, str], ...]) -> tuple[str, str, str, str, str]:
    """(kind, question, question_type, answer_type, true answer) of one question about the scene.

    A question only names an object the scene holds once, so its answer is defined."""
    shapes = [shape for _, shape in objects]
    colour_targets = _unique(shapes)  # "the <shape>" must be one object
    relation_targets = _unique(list(objects))  # "the <colour> <shape>" must be one object
    kinds = ["count", "existence"]
    if colour_targets:
        kinds.append("color")
    if len(objects) > 1 and relation_targets:
        kinds.append("relation")
    kind = rng.choice(sorted(kinds, key=QUESTION_KINDS.index))
    if kind == "color":
        color, shape = objects[rng.choice(colour_targets)]
        return kind, f"what color is the {shape}?", "what color is the", "other", color
    if kind == "count":
        if rng.random() < 0.5:
            return kind, "how many shapes are there?", "how many", "number", str(len(objects))
        color = rng.choice(list(COLORS))
        count = sum(c == color for c, _ in objects)
        return kind, f"how many {color} shapes are there?", "how many", "number", str(count)
    if kind == "relation":
        index = rng.choice(relation_targets)
        color, shape = objects[index]
        # The leftmost object has nothing to its left, the rightmost nothing to its right.
        side = "left" if index == len(objects) - 1 or (index > 0 and rng.random() < 0.5) else "right"
        neighbour = objects[index - 1 if side == "left" else index + 1][1]
        return kind, f"what is {side} of the {color} {shape}?", f"what is {side} of the", "other", neighbour
    present = rng.random() < 0.5
    shape = rng.choice(sorted(set(shapes)) if present else [s for s in SHAPES if s not in shapes])
    return kind, f"is there {_article(shape)} {shape}?", "is there a", "yes/no", "yes" if present else "no"


def _wrong_answer(rng: random.Random, kind: str, answer: str) -> str:
    """A plausible wrong answer of the same kind: another colour, a count one off, another shape, the other of yes/no."""
    if kind == "color":
        return rng.choice([c for c in COLORS if c != answer])
    if kind == "count":
        return str(max(0, int(answer) + rng.choice((-1, 1))) if answer != "0" else 1)
    if kind == "relation":
        return rng.choice([s for s in SHAPES if s != answer])
    return "no" if answer == "yes" else "yes"


def make_question(rng: random.Random, objects: tuple[tuple[str, str], ...]) -> DemoQuestion:
    """One question about the scene with ANSWERS_PER_QUESTION annotators' answers, noise included."""
    kind, question, question_type, answer_type, true_answer = _ask(rng, objects)
    answers = []
    for _ in range(ANSWERS_PER_QUESTION):
        if rng.random() < ANSWER_NOISE:
            answers.append(_wrong_answer(rng, kind, true_answer))
        elif kind == "count" and rng.random() < NUMBER_AS_WORD:
            answers.append(NUMBER_WORDS[int(true_answer)])
        else:
            answers.append(true_answer)
    return DemoQuestion(question, tuple(answers), question_type, answer_type, true_answer, kind)


def generate_demo_samples(config: DemoDataConfig) -> list[DemoSample]:
    """The good samples, in order. A `mismatch_fraction` of them carry another sample's caption."""
    rng = random.Random(config.seed)
    # Questions draw from their own stream, so the images and captions do not depend on them.
    question_rng = random.Random(f"{config.seed}-questions")
    scenes = [sample_scene(rng) for _ in range(config.num_samples)]
    jpegs = [_render(rng, config.image_size, objects) for objects in scenes]
    captions = [scene_caption(objects) for objects in scenes]
    n_mismatched = round(config.mismatch_fraction * config.num_samples)
    mismatched = set(rng.sample(range(config.num_samples), n_mismatched))
    samples = []
    for index, (objects, jpeg, true_caption) in enumerate(zip(scenes, jpegs, captions)):
        words = tuple(shape for _, shape in objects)
        caption = true_caption
        if index in mismatched:
            # Another image's caption that really differs (web noise, not a duplicate).
            while True:
                donor = rng.randrange(config.num_samples)
                if captions[donor] != true_caption and {s for _, s in scenes[donor]} != set(words):
                    caption = captions[donor]
                    break
        samples.append(
            DemoSample(
                path=f"img/{index:06d}.jpg",
                jpeg=jpeg,
                caption=caption,
                true_caption=true_caption,
                objects=objects,
                object_words=words,
                is_mismatched=index in mismatched,
                question=make_question(question_rng, objects),
            )
        )
    return samples


def broken_paths(config: DemoDataConfig) -> dict[str, str]:
    """URL path -> broken kind, `broken_per_kind` of each kind. The server decides by prefix."""
    return {
        f"broken/{kind}/{i:03d}.jpg": kind for kind in BROKEN_KINDS for i in range(config.broken_per_kind)
    }


def demo_url_rows(samples: list[DemoSample], config: DemoDataConfig, base_url: str) -> list[dict]:
    """Rows of the URL list (url, caption, the question columns, plus ground truth) with broken URLs interleaved."""
    rows = [
        {
            "url": f"{base_url}/{s.path}",
            "caption": s.caption,
            "question": s.question.question,
            "answers": list(s.question.answers),
            "question_type": s.question.question_type,
            "answer_type": s.question.answer_type,
            "true_caption": s.true_caption,
            "true_answer": s.question.true_answer,
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
            "question": f"is there a broken link of kind {kind}?",
            "answers": ["yes"] * ANSWERS_PER_QUESTION,
            "question_type": "is there a",
            "answer_type": "yes/no",
            "true_caption": "",
            "true_answer": "",
            "object_words": "",
            "is_mismatched": False,
            "expected": BROKEN_KINDS[kind],
        }
        rows.insert(rng.randrange(len(rows) + 1), row)
    return rows


# -- Alternative phrasings (issue 18 item 6: the demo's paraphrase backend) ------------------------
#
# The processing stage sees a sample's text only, never the scene it came from (a web caption may
# even describe another image), so these functions parse the text back through the grammar above
# and say the same thing in other words: the same objects, colours and left-to-right order, or the
# same question with the same answer. Text the grammar did not make gets no phrasings.

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")


def parse_scene_caption(text: str) -> tuple[tuple[str, str], ...] | None:
    """The inverse of `scene_caption`: (colour, shape) of each object left to right, or None when
    `text` is not a caption the grammar makes."""
    text = " ".join(text.strip().lower().split())
    if text.endswith(" from left to right"):
        head, joined, last = text[: -len(" from left to right")].rpartition(" and ")
        phrases = head.split(", ") + [last] if joined else []
    elif " left of " in text:
        phrases = text.split(" left of ")
    else:
        phrases = [text]
    objects = []
    for phrase in phrases:
        words = phrase.split(" ")
        if len(words) != 3 or words[1] not in COLORS or words[2] not in SHAPES or words[0] != _article(words[1]):
            return None
        objects.append((words[1], words[2]))
    if not objects or scene_caption(tuple(objects)) != text:  # e.g. "a x left of a y left of a z" is no grammar caption
        return None
    return tuple(objects)


def _listed(phrases: list[str]) -> str:
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def caption_phrasings(objects: tuple[tuple[str, str], ...]) -> list[str]:
    """Other correct captions of the scene than `scene_caption` gives (at least five, in a fixed order):
    each names every object with its colour and keeps (or explicitly reverses) the left-to-right order."""
    phrases = [_phrase(color, shape) for color, shape in objects]
    count = COUNT_WORDS[len(objects)] if len(objects) < len(COUNT_WORDS) else str(len(objects))
    if len(objects) == 1:
        (color, shape), = objects
        return [f"one {color} {shape}", f"a single {color} {shape}", f"there is {phrases[0]}",
                f"{phrases[0]} on its own", f"a picture of {phrases[0]}", f"an image showing {phrases[0]}"]
    if len(objects) == 2:
        first, second = phrases
        return [f"{second} right of {first}", f"{first} to the left of {second}",
                f"{first} and {second} from left to right", f"{second} and {first} from right to left",
                f"{first} on the left and {second} on the right", f"two shapes: {first} left of {second}"]
    return [f"from left to right: {_listed(phrases)}", f"{_listed(phrases[::-1])} from right to left",
            ", then ".join(phrases), f"{count} shapes from left to right: {_listed(phrases)}",
            f"{phrases[0]} on the left, then {', then '.join(phrases[1:-1])}, and {phrases[-1]} on the right",
            f"{count} shapes in a row from left to right: {', '.join(phrases)}"]


_QUESTION_PATTERNS = (
    # (question grammar of `_ask`, its other phrasings); the groups are what the phrasings repeat.
    (r"what color is the (\w+)\?", ("what colour is the {0}?", "which color is the {0}?", "what is the color of the {0}?",
                                     "the {0} is what color?", "what color does the {0} have?")),
    (r"how many shapes are there\?", ("how many shapes are in the picture?", "how many shapes can you see?",
                                      "what is the number of shapes?", "how many objects are there?",
                                      "count the shapes: how many are there?")),
    (r"how many (\w+) shapes are there\?", ("how many {0} shapes are in the picture?", "how many {0} shapes can you see?",
                                            "what is the number of {0} shapes?", "how many {0} objects are there?",
                                            "how many shapes are {0}?")),
    (r"what is (left|right) of the (\w+) (\w+)\?", ("what is to the {0} of the {1} {2}?", "what shape is {0} of the {1} {2}?",
                                                    "which shape is to the {0} of the {1} {2}?",
                                                    "what is just {0} of the {1} {2}?",
                                                    "what does the {1} {2} have to its {0}?")),
    (r"is there (?:a|an) (\w+)\?", ("is there any {0}?", "can you see {1} {0}?", "does the picture show {1} {0}?",
                                    "is {1} {0} in the picture?", "does the image contain {1} {0}?")),
)


def question_phrasings(question: str) -> list[str]:
    """Other phrasings of a question `make_question` asks, with the same answer (five, in a fixed
    order); [] for a question it does not ask."""
    import re

    text = " ".join(question.strip().lower().split())
    for pattern, phrasings in _QUESTION_PATTERNS:
        match = re.fullmatch(pattern, text)
        if match is None:
            continue
        words = match.groups()
        if any(word not in COLORS and word not in SHAPES and word not in ("left", "right") for word in words):
            return []
        arguments = (*words, _article(words[-1])) if words else ()
        return [phrasing.format(*arguments) for phrasing in phrasings]
    return []


def alternative_phrasings(text: str, count: int) -> list[str]:
    """Up to `count` correct rephrasings of a demo caption or question, chosen from its phrasings by
    a generator seeded with the text (so the same text always gets the same ones, in the same order)."""
    import zlib

    objects = parse_scene_caption(text)
    phrasings = caption_phrasings(objects) if objects is not None else question_phrasings(text)
    return random.Random(zlib.crc32(text.encode("utf-8"))).sample(phrasings, min(count, len(phrasings)))
