"""The question-answer helpers (vlpdist/data/question_answer.py): prompt, answer target, answer parsing."""

import random

import numpy as np
import pytest

from vlpdist.data import question_answer as qa


def test_prompt_fills_only_the_question_placeholder():
    assert qa.format_question_prompt(qa.DEFAULT_QUESTION_TEMPLATE, " what colour? ") == "Question: what colour? Answer:"
    # A question with braces is text, not a second placeholder.
    assert qa.format_question_prompt("Q: {question} A: {x}", "is {it} red") == "Q: is {it} red A: {x}"
    with pytest.raises(ValueError, match="placeholder"):
        qa.format_question_prompt("Answer:", "why")


def test_most_common_breaks_ties_by_first_occurrence():
    assert qa.choose_answer_target(["no", "yes", "yes", "no", "maybe"], "most_common", None) == "no"
    assert qa.choose_answer_target(["2", "3", "3"], "most_common", None) == "3"


@pytest.mark.parametrize("rng", [random.Random(0), np.random.default_rng(0)])
def test_sample_follows_answer_frequency(rng):
    answers = ["red"] * 7 + ["blue"] * 3
    draws = [qa.choose_answer_target(answers, "sample", rng) for _ in range(2000)]
    share = draws.count("red") / len(draws)
    assert set(draws) == {"red", "blue"}
    assert 0.65 < share < 0.75  # 7/10 within ~4.6 standard deviations at n=2000


def test_choose_refuses_no_answers_and_unknown_mode():
    with pytest.raises(ValueError, match="no answers"):
        qa.choose_answer_target([], "sample", random.Random(0))
    with pytest.raises(ValueError, match="mode"):
        qa.choose_answer_target(["a"], "vote", random.Random(0))


def test_answers_parse_from_every_carrier():
    assert qa.parse_answers('["a", "b"]') == ["a", "b"]  # csv/tsv: a JSON list
    assert qa.parse_answers(["a"]) == ["a"]  # jsonl / json
    assert qa.parse_answers(np.array(["x", "y"], dtype=object)) == ["x", "y"]  # parquet list column
    assert qa.parse_answers("") == [] and qa.parse_answers(None) == [] and qa.parse_answers(float("nan")) == []
    with pytest.raises(ValueError, match="JSON list"):
        qa.parse_answers("yes, no")
    with pytest.raises(ValueError, match="list of strings"):
        qa.parse_answers("[1, 2]")


def test_qa_fields_normalises_a_record():
    record = {"caption": "", "question": " is it red ", "answers": '["yes"]', "answer_type": "yes/no", "question_type": ""}
    assert qa.qa_fields(record) == {"question": "is it red", "answers": ["yes"], "answer_type": "yes/no"}
    assert qa.qa_fields({"caption": "a cat"}) == {}
    assert qa.qa_fields({"question": float("nan")}) == {}
