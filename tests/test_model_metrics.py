"""Caption metrics through pycocoevalcap, and the most-frequent-caption baseline."""

from __future__ import annotations

import pytest

from vlpdist.errors import UserError
from vlpdist.eval.captioning import TokenizerMismatch, caption_metrics, most_frequent_caption, run_ptb_tokenizer

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
    assert most_frequent_caption(train) == "a green star"
    predictions = {key: most_frequent_caption(train) for key in REFERENCES}
    scores = caption_metrics(REFERENCES, predictions)
    assert 0.0 < scores["CIDEr"] < caption_metrics(REFERENCES, {k: r[0] for k, r in REFERENCES.items()})["CIDEr"]


# 20 images, two references each; the predictions are each image's first reference.
TWENTY = {f"img{i}": [f"a {colour} {shape} on the {place}", f"the {shape} is {colour}"]
          for i, (colour, shape, place) in enumerate(
              (c, s, p) for c in ("red", "green", "blue", "yellow", "white") for s, p in (("car", "table"), ("dog", "road"),
                                                                                          ("cup", "shelf"), ("bird", "wire"))
          )}


@pytest.mark.parametrize("line_break", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\r\n"])
def test_a_line_break_in_a_caption_scores_as_a_space(line_break):
    predictions = {key: refs[0] for key, refs in TWENTY.items()}
    predictions["img0"] = f"a red car{line_break}on the table"
    with_space = dict(predictions, img0="a red car on the table")
    assert caption_metrics(TWENTY, predictions) == caption_metrics(TWENTY, with_space)
    # In a reference too: the later images keep their own references.
    references = dict(TWENTY, img3=[f"a red bird{line_break}on the wire", "the bird is red"])
    assert caption_metrics(references, predictions) == caption_metrics(dict(TWENTY, img3=["a red bird on the wire", "the bird is red"]), with_space)


def test_the_tokenizer_line_count_is_checked():
    # The Java tokenizer really ends a line at \r: without the normalisation, captions would shift.
    assert run_ptb_tokenizer(["a red car on the table", "", "a dog"]) == ["a red car on the table", "", "a dog"]
    with pytest.raises(TokenizerMismatch, match="returned 4 lines for 3 captions"):
        run_ptb_tokenizer(["a red car\ron the table", "", "a dog"])


def test_published_clipcap_row_only_beside_a_full_karpathy_test_run():
    from vlpdist.eval.scoring import format_caption_table, published_clipcap_applies

    assert published_clipcap_applies(coco_format=True, images=5000)
    assert not published_clipcap_applies(coco_format=True, images=4999)
    assert not published_clipcap_applies(coco_format=False, images=5000)  # feature shards: other data
    ours = {"greedy": {"BLEU-4": 0.3, "CIDEr": 1.0}}
    beside = format_caption_table(ours, 5000, {}, published=True)
    assert "ClipCap (published)" in beside and "33.53" in beside and "113.08" in beside
    assert "differs in model (its transformer mapper, GPT-2) and data (trained on COCO Karpathy train)" in beside
    alone = format_caption_table(ours, 5, {})
    assert "ClipCap" not in alone and "33.53" not in alone
