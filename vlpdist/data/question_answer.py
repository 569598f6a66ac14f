"""Question-answer samples (issue 18): the field names they travel under and the two choices
training makes for each one (the prompt it reads, the answer it is taught).

A URL-list row, the raw shard's json and a feature-shard sample carry the same four keys when the
row holds a question; absent keys mean "caption sample only". One row per question: an image with
five questions is five rows. A question row may have an empty caption (VQAv2) or a caption too
(the demo world: a caption and one question per image).
"""

from __future__ import annotations

import collections
import json
import math
from typing import Any, Sequence

QUESTION = "question"
"""The question (str)."""
ANSWERS = "answers"
"""The human answers (list of str, typically VQAv2's 10; in csv/tsv a JSON-encoded list)."""
QUESTION_TYPE = "question_type"
"""Optional (str): VQAv2's question type ("what color is the", "how many", ...)."""
ANSWER_TYPE = "answer_type"
"""Optional (str): "yes/no", "number" or "other"."""
QA_FIELDS = (QUESTION, ANSWERS, QUESTION_TYPE, ANSWER_TYPE)

DEFAULT_QUESTION_TEMPLATE = "Question: {question} Answer:"
ANSWER_TARGET_MODES = ("sample", "most_common")


def format_question_prompt(template: str, question: str) -> str:
    """The text the LM reads after the visual prefix: `template` with `{question}` filled in.
    Only that one placeholder is filled, so braces elsewhere in a question or template stay text."""
    if "{question}" not in template:
        raise ValueError(f"question template {template!r} has no '{{question}}' placeholder")
    return template.replace("{question}", question.strip())


def choose_answer_target(answers: Sequence[str], mode: str, rng: Any) -> str:
    """The answer a question is trained towards.

    mode "sample": one answer drawn with probability proportional to how many humans gave it
    (uniform over the list, which repeats an answer as often as it was given); "most_common": the
    most frequent answer, ties broken by first occurrence (deterministic; `rng` unused). `rng` is a
    `random.Random` or a numpy Generator (anything with `integers` or `randrange`)."""
    if not answers:
        raise ValueError("a question sample has no answers")
    if mode == "most_common":
        counts = collections.Counter(answers)
        best = max(counts.values())
        return next(answer for answer in answers if counts[answer] == best)
    if mode == "sample":
        index = int(rng.integers(len(answers))) if hasattr(rng, "integers") else rng.randrange(len(answers))
        return answers[index]
    raise ValueError(f"answer target mode {mode!r}; expected one of {list(ANSWER_TARGET_MODES)}")


def parse_answers(value: Any) -> list[str]:
    """The answers of one row as a list of str, from a list (parquet, jsonl, a sample's json) or
    a JSON-encoded list (csv, tsv). Empty or missing -> []. Anything else is a ValueError with
    a one-line reason (the caller decides whether that fails the row or the run)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):  # pandas' empty csv cell
        return []
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy array from a parquet list column
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"answers {text[:40]!r} is not a JSON list ({err.msg})") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"answers must be a list of strings, got {type(value).__name__}")
    if not all(isinstance(answer, str) for answer in value):
        raise ValueError("answers must be a list of strings")
    return [answer for answer in value]


def qa_fields(record: dict) -> dict:
    """The question-answer keys of `record` (a row or a sample's json), normalised: a question
    (non-empty str) with its answers as a list, and the optional types when present. {} when the
    record holds no question."""
    question = record.get(QUESTION)
    if not isinstance(question, str) or not question.strip():
        return {}
    out = {QUESTION: question.strip(), ANSWERS: parse_answers(record.get(ANSWERS))}
    for key in (QUESTION_TYPE, ANSWER_TYPE):
        value = record.get(key)
        if isinstance(value, str) and value:
            out[key] = value
    return out


def alignment_text(question: str, answers: Sequence[str]) -> str:
    """The text a question sample WITHOUT a caption aligns with (ITC, and the CLIP text embedding
    stored for it): the question followed by its most common answer, "what colour is the circle? red".
    A question alone says what is asked, not what is seen; with its answer it states a fact about
    the image. A question sample that has a caption aligns with the caption."""
    return f"{question.strip()} {choose_answer_target(list(answers), 'most_common', None)}"
