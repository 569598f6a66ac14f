"""Object labels from captions: plurals, synonyms, multi-word categories, vocabulary files."""

from __future__ import annotations

import pytest

from data_ingest.process.labels import extract_labels, load_vocabulary
from vlpdist.errors import UserError


def _names(caption: str, vocabulary) -> list[str]:
    return [vocabulary.names[label] for label in extract_labels(caption, vocabulary)]


def test_coco80_has_80_categories_in_coco_order():
    vocabulary = load_vocabulary("coco80")
    assert len(vocabulary.names) == 80
    assert vocabulary.names[0] == "person" and vocabulary.names[-1] == "toothbrush"


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Two puppies chase a man", ["person", "dog"]),  # irregular plural listed in the file, synonym
        ("three buses and some geese", ["bus", "bird"]),  # +es plural, irregular plural of a synonym
        ("two ladies on a sofa", ["person", "couch"]),  # y -> ies plural added by the code
        ("Traffic lights near stop signs", ["traffic light", "stop sign"]),  # plural of a phrase's last word
        ("a hot dog and a dog", ["dog", "hot dog"]),  # longest phrase wins where phrases overlap
        ("a television, a TV and a laptop", ["laptop", "tv"]),
        ("an empty beach at dusk", []),
    ],
)
def test_coco80_plurals_and_synonyms(caption, expected):
    assert _names(caption, load_vocabulary("coco80")) == sorted(expected, key=load_vocabulary("coco80").names.index)


def test_demo_shapes_vocabulary_matches_demo_captions():
    vocabulary = load_vocabulary("demo_shapes")
    assert _names("a red circle, a blue star and a green diamond from left to right", vocabulary) == [
        "circle", "star", "diamond"
    ]
    assert _names("two squares and a rhombus", vocabulary) == ["square", "diamond"]


def test_custom_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("# my categories\nmouse, mice\nice cream, gelato\n")
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.names == ("mouse", "ice cream")
    assert extract_labels("three mice eating ice creams", vocabulary) == [0, 1]


def test_missing_or_empty_vocabulary_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="process.vocab"):
        load_vocabulary(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(UserError, match="no categories"):
        load_vocabulary(str(empty))
