"""Questions in training (issue 18 items 1-2): feature shards with question samples (question-only,
question + caption), the loader's task choice, and a 2-rank gloo run whose answer loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlpdist.data.feature_shards import (
    QuestionSampling,
    build_shard_plan,
    build_train_loader,
    iterate_heldout,
    iterate_heldout_questions,
    list_feature_shards,
)

COLOURS, SHAPES = ["red", "blue", "green"], ["circle", "square", "star"]


def write_qa_feature_shards(folder: Path, num_shards: int = 4, per_shard: int = 48, dim: int = 32) -> Path:
    """Shards where a third of the samples are question-only (no caption), a third hold a caption
    and a question, a third a caption only; the answer (colour or shape) is in the image embedding."""
    import webdataset as wds

    from vlpdist.atomic import atomic_write_json
    from vlpdist.data.feature_format import encode_feature_sample, write_label_vocabulary
    from vlpdist.data.question_answer import alignment_text

    rng = np.random.default_rng(0)
    vectors = {word: rng.standard_normal(dim) for word in COLOURS + SHAPES}
    folder.mkdir(parents=True, exist_ok=True)
    write_label_vocabulary(folder, SHAPES)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                colour, shape = COLOURS[rng.integers(3)], SHAPES[rng.integers(3)]
                caption = f"a {colour} {shape}"
                kind = index % 3
                asks_colour = bool(rng.integers(2))
                qa = {"question": "colour?" if asks_colour else "shape?",
                      "answers": [colour if asks_colour else shape] * 9 + ["blue"],
                      "answer_type": "other", "question_type": "what"}
                captions = [] if kind == 0 else [caption]
                text = unit(vectors[colour] + vectors[shape])[None]
                if not captions:
                    assert alignment_text(qa["question"], qa["answers"]).endswith(qa["answers"][0])
                writer.write(encode_feature_sample(
                    key, unit(vectors[colour] + vectors[shape] + 0.1 * rng.standard_normal(dim)), text, captions,
                    [SHAPES.index(shape)], [shape], {}, "kept", "", caption if captions else "", qa if kind != 2 else None))
        atomic_write_json(folder / f"{path.stem}_stats.json", {"shard": path.stem, "written": per_shard})
    return folder


@pytest.fixture(scope="module")
def qa_features(tmp_path_factory) -> Path:
    return write_qa_feature_shards(tmp_path_factory.mktemp("qa") / "features")


def _lm_inputs(captions, questions, answers):
    import torch

    rows = len(captions)
    ids = torch.ones(rows, 2, dtype=torch.long)
    return ids, ids.clone(), torch.tensor([[0, 1] if q else [1, 1] for q in questions])


def test_loader_trains_question_only_samples_as_questions_and_mixes_the_rest(qa_features):
    shards = list_feature_shards(qa_features)[:3]
    plan = build_shard_plan([str(s) for s in shards], 1, 0, 12, 0, [], [48] * 3)
    loader = iter(build_train_loader(plan, 0, 0, None, lm_inputs=_lm_inputs, sampling=QuestionSampling(0.5, "most_common", 0)))
    asked = {"question-only": [], "both": [], "caption-only": []}
    for _ in range(plan.batches_per_rank):
        batch = next(loader)
        for row, (captions, qa) in enumerate(zip(batch["captions"], batch["qa"])):
            kind = "question-only" if not captions else ("both" if qa else "caption-only")
            asked[kind].append(bool(batch["is_question"][row]))
            if batch["is_question"][row]:
                assert batch["answer"][row] == qa["answers"][0]  # most_common
                assert batch["target_mask"][row].tolist() == [0, 1]
            if not captions:  # aligns with its question and answer
                assert batch["caption"][row] == f"{qa['question']} {qa['answers'][0]}"
    assert all(asked["question-only"]) and not any(asked["caption-only"])
    assert 0.3 < np.mean(asked["both"]) < 0.7


def test_heldout_captions_skip_question_only_samples_and_questions_come_apart(qa_features):
    shard = list_feature_shards(qa_features)[-1:]
    captions = [c for batch in iterate_heldout(shard, 16, 48) for c in batch["caption"]]
    questions = [batch for batch in iterate_heldout_questions(shard, 16, 48)]
    assert len(captions) == 32 and all(c.startswith("a ") for c in captions)
    assert sum(len(b["question"]) for b in questions) == 32
    assert questions[0]["answers"][0][0] in COLOURS + SHAPES and questions[0]["answer_type"][0] == "other"


@pytest.mark.slow
def test_two_rank_gloo_run_with_mixed_samples_lowers_the_answer_loss(qa_features, tiny_lm, tmp_path):
    from train_fixtures import launch, read_metrics, tiny_overrides

    run = tmp_path / "run"
    result = launch(tiny_overrides(qa_features, tiny_lm, run, "train.max_steps=30", "train.checkpoint_every=30",
                                   "train.caption_log_every=0", "model.question_template=Q: {question} A:",
                                   "model.max_caption_tokens=24", "train.question_fraction=0.5",
                                   "train.export_at_end=true", "model.freeze_lm=false", "train.lr=3e-3"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(run)
    answers = [m["ans"] for m in metrics]
    assert all(a > 0 for a in answers)  # every micro-batch held questions (a third question-only)
    assert np.mean(answers[-5:]) < 0.7 * np.mean(answers[:5]), answers
    import yaml

    saved = yaml.safe_load((run / "export" / "config.yaml").read_text())
    assert saved["model"]["question_template"] == "Q: {question} A:"
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["vqa"]["questions"] == 32
