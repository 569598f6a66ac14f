"""Caption metrics through pycocoevalcap, and the most-frequent-caption baseline."""

from __future__ import annotations

import pytest

from vlpdist.errors import UserError
from vlpdist.eval.captioning import caption_metrics, most_frequent_caption_baseline

REFERENCES = {
    0: ["a red circle left of a blue square", "a red circle and a blue square"],
    1: ["a green star"],
    "img-2": ["a yellow diamond, a red circle and a blue star from left to right"],
}


def test_perfect_predictions_beat_wrong_ones():
    perfect = caption_metrics(REFERENCES, {key: refs[0] for key, refs in REFERENCES.items()})
    wrong = caption_metrics(REFERENCES, {0: "a purple triangle", 1: "", "img-2": "a green star left of a square"})
    assert set(perfect) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)
    for name in perfect:
        assert perfect[name] > wrong[name], name
    assert perfect["CIDEr"] > 1.0 > wrong["CIDEr"]


def test_mismatched_ids_are_a_user_error():
    with pytest.raises(UserError, match="different ids"):
        caption_metrics(REFERENCES, {0: "a red circle"})


def test_most_frequent_caption_baseline():
    train = ["a green star", "a red circle", "a green star ", "a blue square"]
    predictions = most_frequent_caption_baseline(train, REFERENCES)
    assert predictions == {key: "a green star" for key in REFERENCES}
    scores = caption_metrics(REFERENCES, predictions)
    assert 0.0 < scores["CIDEr"] < caption_metrics(REFERENCES, {k: r[0] for k, r in REFERENCES.items()})["CIDEr"]
