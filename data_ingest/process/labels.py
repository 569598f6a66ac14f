"""Object labels from captions: words and phrases matched against a category vocabulary.

A vocabulary file has one category per line: the category name, then synonyms and irregular
plurals, comma-separated (`dog, puppy, puppies`). `#` starts a comment line. The label id of a
category is its position among the non-comment lines. Regular plurals of every term (+s, +es,
y -> ies, applied to the last word of a phrase) are added here, so files list only irregular ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlpdist.errors import UserError

SHIPPED_VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Vocabulary:
    """Category names by label id and every matchable phrase (a tuple of words) -> label id."""

    names: tuple[str, ...]
    phrase_to_label: dict[tuple[str, ...], int]
    longest_phrase: int


def _plural_forms(word: str) -> set[str]:
    forms = {word + "s"}
    if word.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(word + "es")
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    return forms


def resolve_vocab_path(vocab: str) -> Path:
    """A shipped vocabulary name (`coco80`) or a path to a file."""
    shipped = SHIPPED_VOCAB_DIR / f"{vocab}.txt"
    if shipped.is_file():
        return shipped
    path = Path(vocab)
    if not path.is_file():
        known = sorted(p.stem for p in SHIPPED_VOCAB_DIR.glob("*.txt"))
        raise UserError(f"config key 'process.vocab': {vocab!r} is neither a shipped vocabulary {known} nor a file")
    return path


def load_vocabulary(vocab: str) -> Vocabulary:
    path = resolve_vocab_path(vocab)
    names: list[str] = []
    phrase_to_label: dict[tuple[str, ...], int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        terms = [term.strip().lower() for term in line.split(",") if term.strip()]
        label = len(names)
        names.append(terms[0])
        for term in terms:
            words = tuple(_WORD.findall(term))
            if not words:
                continue
            # An earlier category keeps a phrase listed twice (the file order decides).
            phrase_to_label.setdefault(words, label)
            for plural in _plural_forms(words[-1]):
                phrase_to_label.setdefault(words[:-1] + (plural,), label)
    if not names:
        raise UserError(f"vocabulary file {path} lists no categories")
    return Vocabulary(tuple(names), phrase_to_label, max(len(p) for p in phrase_to_label))


def extract_labels(caption: str, vocabulary: Vocabulary) -> list[int]:
    """Sorted unique label ids of the objects a caption names; longest phrase wins at each position."""
    words = _WORD.findall(caption.lower())
    labels: set[int] = set()
    position = 0
    while position < len(words):
        for length in range(min(vocabulary.longest_phrase, len(words) - position), 0, -1):
            label = vocabulary.phrase_to_label.get(tuple(words[position : position + length]))
            if label is not None:
                labels.add(label)
                position += length
                break
        else:
            position += 1
    return sorted(labels)
