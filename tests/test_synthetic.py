"""The demo generator is deterministic, records its ground truth, makes label sharing informative, and
asks one question about each scene whose 10 answers agree with the scene except for the set noise."""

import io
import itertools
import re

import pytest
from PIL import Image

from data_ingest.process.labels import extract_labels, load_vocabulary
from data_ingest.sources.synthetic import (
    ANSWER_NOISE,
    ANSWERS_PER_QUESTION,
    BROKEN_KINDS,
    COLORS,
    MAX_OBJECTS,
    NUMBER_WORDS,
    QUESTION_COLUMNS,
    QUESTION_KINDS,
    SHAPES,
    broken_paths,
    demo_url_rows,
    generate_demo_samples,
)
from vlpdist.config import DemoDataConfig


@pytest.fixture(scope="module")
def world():
    """800 samples of the demo's default seed: enough for every rate below to sit well inside its bound."""
    return generate_demo_samples(DemoDataConfig(num_samples=800, seed=0))


def test_same_seed_same_bytes_captions_and_questions():
    config = DemoDataConfig(num_samples=50, seed=7)
    first, second = generate_demo_samples(config), generate_demo_samples(config)
    assert [s.jpeg for s in first] == [s.jpeg for s in second]
    assert [s.caption for s in first] == [s.caption for s in second]
    assert [s.question for s in first] == [s.question for s in second]


def test_other_seed_other_world():
    a = generate_demo_samples(DemoDataConfig(num_samples=50, seed=1))
    b = generate_demo_samples(DemoDataConfig(num_samples=50, seed=2))
    assert [s.jpeg for s in a] != [s.jpeg for s in b]


def test_ground_truth_is_recorded():
    config = DemoDataConfig(num_samples=200, seed=0, mismatch_fraction=0.25)
    samples = generate_demo_samples(config)
    mismatched = [s for s in samples if s.is_mismatched]
    assert len(mismatched) == 50
    for sample in samples:
        words = re.findall(r"[a-z]+", sample.true_caption)
        assert [w for w in words if w in SHAPES] == list(sample.object_words) == [s for _, s in sample.objects]
        assert [w for w in words if w in COLORS] == [c for c, _ in sample.objects]
        assert 1 <= len(sample.object_words) <= MAX_OBJECTS
        if sample.is_mismatched:
            assert sample.caption != sample.true_caption and set(sample.caption.split()) & set(SHAPES) != set(sample.object_words)
        else:
            assert sample.caption == sample.true_caption
        image = Image.open(io.BytesIO(sample.jpeg))
        assert image.size == (config.image_size, config.image_size)


def test_the_label_stage_extracts_every_object_word(world):
    """The processing stage's own extraction with the demo's vocabulary finds exactly the objects shown."""
    vocabulary = load_vocabulary("demo_shapes")
    assert set(SHAPES) <= set(vocabulary.names)
    for sample in world:
        assert {vocabulary.names[label] for label in extract_labels(sample.true_caption, vocabulary)} == set(sample.object_words)


def test_label_sharing_is_informative(world):
    """>= 20 classes, 1-4 objects an image, and fewer than a third of random pairs share a label (SupCon's
    positives), measured over the generator's own output."""
    assert len(SHAPES) >= 20 and MAX_OBJECTS == 4
    assert {w for s in world for w in s.object_words} == set(SHAPES)
    assert {len(s.object_words) for s in world} == {1, 2, 3, 4}
    labels = [set(s.object_words) for s in world[:400]]
    pairs = list(itertools.combinations(labels, 2))
    sharing = sum(bool(a & b) for a, b in pairs) / len(pairs)
    assert 0.05 < sharing < 1 / 3, sharing
    assert len({s.true_caption for s in world}) > 0.8 * len(world)  # one-object scenes repeat (8 x 22 of them)


def _scene_answer(sample) -> str:
    """The answer to the sample's question worked out from its objects alone (not from the generator's answer)."""
    question, objects = sample.question.question, sample.objects
    shapes = [shape for _, shape in objects]
    if match := re.fullmatch(r"what color is the (\w+)\?", question):
        assert shapes.count(match[1]) == 1, "the question names one object"
        return next(color for color, shape in objects if shape == match[1])
    if question == "how many shapes are there?":
        return str(len(objects))
    if match := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(color == match[1] for color, _ in objects))
    if match := re.fullmatch(r"what is (left|right) of the (\w+) (\w+)\?", question):
        index = objects.index((match[2], match[3]))
        assert objects.count((match[2], match[3])) == 1, "the question names one object"
        return shapes[index - 1 if match[1] == "left" else index + 1]
    if match := re.fullmatch(r"is there an? (\w+)\?", question):
        return "yes" if match[1] in shapes else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_questions_agree_with_the_scene_but_for_the_annotator_noise(world):
    types = {"color": ("what color is the", "other"), "count": ("how many", "number"),
             "existence": ("is there a", "yes/no")}
    wrong = total = 0
    for sample in world:
        question = sample.question
        truth = _scene_answer(sample)
        assert question.true_answer == truth
        assert len(question.answers) == ANSWERS_PER_QUESTION
        if question.kind == "relation":
            assert (question.question_type, question.answer_type) in {("what is left of the", "other"),
                                                                       ("what is right of the", "other")}
        else:
            assert (question.question_type, question.answer_type) == types[question.kind]
        # A count written as a word ("two") is the same answer after the VQA normalisation.
        spelled = [str(NUMBER_WORDS.index(a)) if a in NUMBER_WORDS else a for a in question.answers]
        wrong += sum(answer != truth for answer in spelled)
        total += len(spelled)
    assert {s.question.kind for s in world} == set(QUESTION_KINDS)
    assert {s.question.answer_type for s in world} == {"yes/no", "number", "other"}
    assert {s.question.true_answer for s in world if s.question.kind == "existence"} == {"yes", "no"}
    # 8,000 answers: the binomial's standard deviation at p = 0.1 is 0.0034.
    assert abs(wrong / total - ANSWER_NOISE) < 0.015, wrong / total
    assert any(a in NUMBER_WORDS for s in world for a in s.question.answers)


def test_url_rows_hold_every_broken_kind_with_its_expected_reason_and_the_question_columns():
    config = DemoDataConfig(num_samples=20, broken_per_kind=2)
    samples = generate_demo_samples(config)
    rows = demo_url_rows(samples, config, "http://127.0.0.1:1")
    assert len(rows) == 20 + 2 * len(BROKEN_KINDS)
    expected = [r["expected"] for r in rows if r["expected"] != "success"]
    assert sorted(expected) == sorted(reason for reason in BROKEN_KINDS.values() for _ in range(2))
    assert len(broken_paths(config)) == 2 * len(BROKEN_KINDS)
    assert any(r["expected"] != "success" for r in rows[:-len(BROKEN_KINDS)])
    good = [r for r in rows if r["expected"] == "success"]
    assert all(set(QUESTION_COLUMNS) <= set(row) for row in rows)
    assert [r["answers"] for r in good] == [list(s.question.answers) for s in samples]
    assert [r["question"] for r in good] == [s.question.question for s in samples]
