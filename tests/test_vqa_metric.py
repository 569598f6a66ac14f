"""VQA accuracy by the official VQAv2 rules (issue 18 item 3): answer normalisation cases, the
leave-one-out average worked by hand (10 answers and fewer), the per-answer-type breakdown, the
most-common-answer baseline, and `launcher.evaluate --vqa` reporting the numbers the end of
training reports on the same shard, through the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpdist.eval.vqa import (
    NO_ANSWER_TYPE,
    answer_accuracy,
    baseline_answers,
    format_vqa_rows,
    most_common_answers,
    normalize_answer,
    score_vqa,
)


@pytest.mark.parametrize("raw, normalised", [
    ("Two.", "2"),                    # the period goes (no digit follows it), then the number word becomes a digit
    ("the dog", "dog"),               # articles dropped
    ("A Dog", "dog"),                 # lower-cased before the articles are looked up
    ("an apple.", "apple"),
    ("dont", "don't"),                # the contractions table
    ("Im", "im"),                     # the table's capitalised entries never match: words are lower-cased first
    ("1,000", "1000"),                # a digit-comma-digit deletes the commas instead of spacing them
    ("1,000 cats-dogs", "1000 catsdogs"),  # ...and then every other mark in that answer too
    ("red,blue", "red blue"),         # a mark that never touches a space becomes a space
    ("red, blue", "red blue"),        # a mark that touches a space somewhere is deleted everywhere
    ("yes/no", "yes no"),
    ("2.5", "2.5"),                   # a period before a digit stays
    ("3.5.", "3.5"),
    ("none", "0"),
    ("one dog", "1 dog"),
    ("ten", "10"),
    ("twelve", "twelve"),             # only zero..ten (and none) are mapped
    ("it's", "it's"),                 # the apostrophe is not punctuation here
    (" yes\n", "yes"),
    ("what?!", "what"),
])
def test_normalisation_follows_the_official_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_leave_one_out_accuracy_worked_by_hand():
    nine_blue = ["blue"] * 9
    # An answer given by 3 of 10 humans: leaving out one of the 3 leaves 2 matches (2/3), leaving out
    # one of the other 7 leaves 3 (min(1, 3/3) = 1): (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9.
    # (min(1, 3/3) without leaving anyone out would give 1.0.)
    assert answer_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # 1 of 10: (1 * 0/3 + 9 * 1/3) / 10 = 3/10 (1/3 without leaving out).
    assert answer_accuracy("red", ["red"] + nine_blue) == pytest.approx(0.3)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6.
    assert answer_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # 4 of 10: every subset keeps at least 3 matches: 1.0.
    assert answer_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert answer_accuracy("green", ["red"] + nine_blue) == 0.0
    # Both sides are normalised: "Two." matches "2" and "two"; 3 of 10 as above.
    assert answer_accuracy("Two.", ["2", "two", "the two"] + ["3"] * 7) == pytest.approx(0.9)


def test_fewer_than_ten_answers_average_over_their_own_subsets():
    # 3 answers, n = 3 subsets of 2: leaving out either "red" leaves 1 match (1/3), leaving out
    # "blue" leaves 2 (2/3): (1/3 + 1/3 + 2/3) / 3 = 4/9 (dividing by 10 subsets would give 4/30).
    assert answer_accuracy("red", ["red", "red", "blue"]) == pytest.approx(4 / 9)
    # 5 answers, 3 "red": (3 * 2/3 + 2 * 1) / 5 = 4/5.
    assert answer_accuracy("red", ["red"] * 3 + ["blue"] * 2) == pytest.approx(0.8)
    # One human alone: leaving them out leaves nobody, so even their own answer scores 0 (as officially).
    assert answer_accuracy("red", ["red"]) == 0.0
    with pytest.raises(ValueError, match="without human answers"):
        answer_accuracy("red", [])


def test_per_answer_type_breakdown_and_its_counts():
    ten_yes, ten_no = ["yes"] * 10, ["no"] * 10
    predictions = ["yes", "yes", "2", "red"]
    answers = [ten_yes, ten_no, ["2"] * 3 + ["3"] * 7, ["red"] * 10]
    scored = score_vqa(predictions, answers, ["yes/no", "yes/no", "number", ""])
    # Per question 1, 0, 0.9, 1: overall (1 + 0 + 0.9 + 1) / 4 = 72.5 % (the mean of the type rows,
    # (50 + 90 + 100) / 3 = 80, would weigh each type alike).
    assert scored["questions"] == 4
    assert scored["accuracy"] == pytest.approx(72.5)
    assert scored["per_answer_type"] == {
        "yes/no": {"questions": 2, "accuracy": pytest.approx(50.0)},
        "number": {"questions": 1, "accuracy": pytest.approx(90.0)},
        NO_ANSWER_TYPE: {"questions": 1, "accuracy": pytest.approx(100.0)},
    }
    # Exact sums: the order the ranks' questions come in changes no digit.
    order = [2, 0, 3, 1]
    shuffled = score_vqa([predictions[i] for i in order], [answers[i] for i in order], [["yes/no", "yes/no", "number", ""][i] for i in order])
    assert shuffled["accuracy"] == scored["accuracy"]
    with pytest.raises(ValueError):
        score_vqa(["yes"], [ten_yes, ten_no], ["yes/no"])


def test_most_common_answer_baseline_counts_normalised_answers_per_question_type():
    table = most_common_answers(
        ["how many", "how many", "is there a"],
        [["two", "2", "3"], ["3", "Two."], ["yes", "yes", "no"]],
    )
    # "how many": 2 counts three times ("two", "2", "Two."), 3 twice; raw strings would give "3" (twice) first.
    assert table["by_question_type"] == {"how many": "2", "is there a": "yes"}
    assert table["overall"] == "2"  # 3 times against "yes" twice
    assert baseline_answers(table, ["is there a", "what color is the"]) == ["yes", "2"]  # an unseen type: the overall one
    with pytest.raises(ValueError):
        most_common_answers([], [])


def test_summary_rows_set_each_type_beside_both_baselines():
    answers, types = [["yes"] * 10, ["2"] * 10], ["yes/no", "number"]
    vqa = {"accuracy": score_vqa(["yes", "2"], answers, types), "lm_without_image": score_vqa(["no", "2"], answers, types),
           "most_common_answer": score_vqa(["yes", "3"], answers, types)}
    rows = format_vqa_rows(vqa)
    assert rows[0] == ("VQA accuracy (2 questions, x100)", "100.00",
                       "LM without the image 50.00; most common answer per question type 50.00")
    assert rows[1] == ("VQA accuracy: yes/no (1)", "100.00", "LM without the image 0.00; most common answer per question type 100.00")
    assert rows[2] == ("VQA accuracy: number (1)", "100.00", "LM without the image 100.00; most common answer per question type 0.00")


def end_of_training_questions(captioner, run_dir: Path, train_shards: list[Path], heldout_shard: Path, questions: int,
                              store: Path) -> dict:
    """What training's last step scores for questions (`vlpdist.train.run_end.evaluate_questions`), on one gloo rank."""
    import torch.distributed as dist

    from vlpdist.config import load_config
    from vlpdist.data.feature_shards import ShardPlan
    from vlpdist.parallel.engine import DistInfo
    from vlpdist.train.run_end import evaluate_questions
    from vlpdist.train.run_setup import DataWorld

    config = load_config(run_dir / "config.yaml", [f"train.eval_max_samples={questions}", "train.micro_batch_size=8"])
    plan = ShardPlan(shards=[str(path) for path in train_shards], counts=[48] * len(train_shards), world_size=1, num_workers=0,
                     micro_batch_size=8, seed=0, heldout=[str(heldout_shard)])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        return evaluate_questions(captioner, config, DataWorld(plan, heldout_samples=48, clip_dim=32), DistInfo(0, 1, 0, False))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_launcher_evaluate_vqa_reports_the_end_of_training_numbers(tmp_path, tiny_lm, tiny_clip, capsys):
    from export_fixtures import trained_run
    from test_qa_train import write_qa_feature_shards

    from launcher.evaluate import main as evaluate_main
    from launcher.export import main as export_main
    from vlpdist.models import load_exported_captioner

    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    features = write_qa_feature_shards(tmp_path / "features", num_shards=3)  # 48 samples a shard, 32 with a question
    train_shards, heldout = [features / "00000.tar", features / "00001.tar"], features / "00002.tar"
    result = evaluate_main(["--model", str(tmp_path / "export"), "--features", str(heldout), "--vqa", "--max-samples", "20",
                            "--batch-size", "8", "--train-features", *map(str, train_shards), "--out", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    at_training = end_of_training_questions(load_exported_captioner(tmp_path / "export"), tmp_path / "run", train_shards,
                                            heldout, 20, tmp_path / "store")
    vqa = result["vqa"]
    assert vqa == at_training  # every number, baseline table and example
    assert json.loads((tmp_path / "eval.json").read_text())["vqa"] == json.loads(json.dumps(at_training))
    assert vqa["questions"] == 20 and vqa["accuracy"]["per_answer_type"]["other"]["questions"] == 20
    # The shards' answers are 9 of one word and "blue": the training prior per type ("what") is a
    # colour or shape word, never the odd "blue" out.
    assert vqa["most_common_answer_table"]["by_question_type"].keys() == {"what"}
    assert vqa["most_common_answer"]["questions"] == 20
    assert "VQA accuracy (20 questions, x100)" in printed and "most common answer per question type" in printed

    # Shards without a question: --vqa is refused with one line, exit 2.
    from train_fixtures import tiny_features

    captions_only = tiny_features(tmp_path / "captions", num_shards=1, samples_per_shard=4)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model", str(tmp_path / "export"), "--features", str(captions_only), "--vqa",
                       "--out", str(tmp_path / "none.json")])
    assert exit_info.value.code == 2
    assert "--vqa: the feature shards hold no question" in capsys.readouterr().err
