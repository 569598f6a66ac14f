"""The ablation runner on a tiny variant set: real DeepSpeed runs (one rank each) on the tiny synthetic
features; the table has a row per variant with mean ± spread over two seeds, and each row's runs
resolved exactly the overrides it names, over the common ones."""

from __future__ import annotations

import json

import pytest
import yaml
from train_fixtures import TINY_CONFIG, tiny_features

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_ablation_runner_table_and_configs(tmp_path, tiny_lm, capsys):
    from launcher.ablate import CAPTION_METRICS, RETRIEVAL_METRICS, STATIC_FOLD, VARIANTS, main

    features = tiny_features(tmp_path / "features", num_shards=3, samples_per_shard=40)
    # One rank per run (the 2-rank runs are the training tests'): the runner and its table are what is checked here.
    # The common overrides switch ITC and SupCon on, so the caption variant's own overrides must switch them off
    # (a variant's overrides go on top of the common ones); the alignment runs themselves are the training tests'.
    common = [f"root={tmp_path}", f"train.features_dir={features}", f"model.lm_name={tiny_lm}", "train.max_steps=3",
              "train.checkpoint_every=3", "train.eval_max_samples=16", "align.bank_size=32", "train.ep_size=1",
              "align.itc_weight=0.1", "align.supcon_weight=0.1"]
    out = tmp_path / "ablation"
    result = main(["--config", str(TINY_CONFIG), "--variants", f"caption,{STATIC_FOLD}", "--seeds", "0,1",
                   "--ranks", "1", "--out", str(out), "--no-prepare", *common])
    rows = result["rows"]
    assert [row["variant"] for row in rows] == ["caption", STATIC_FOLD]
    static = rows.pop()
    # The static fold of each caption-only run, scored like its exact fold: fewer mapper parameters, an error > 0.
    for seed in ("0", "1"):
        figures = static["per_seed"][seed]
        assert figures["mapper_params"] < figures["exact_fold"]["mapper_params"]
        assert 0 < figures["fold_relative_error"] and figures["exact_fold"]["fold_relative_error"] < 1e-4
        assert set(CAPTION_METRICS) <= set(figures) and set(RETRIEVAL_METRICS) <= set(figures)
        # The exact fold, evaluated by launcher.evaluate, scores as the caption run's own end of training
        # did (the same samples and caption length: launcher.evaluate's default length, the model's
        # max_caption_tokens, is longer than the tiny recipe's train.eval_max_new_tokens).
        trained = rows[0]["per_seed"][seed]
        assert {name: figures["exact_fold"][name] for name in CAPTION_METRICS} == pytest.approx(
            {name: trained[name] for name in CAPTION_METRICS}, rel=1e-6)
    for row in rows:
        assert row["seeds"] == [0, 1] and set(row["per_seed"]) == {"0", "1"}
        assert set(row["mean"]) == set(row["sd"]) == {*CAPTION_METRICS, *RETRIEVAL_METRICS, "caption_loss", "samples_per_s"}
        assert row["overrides"] == VARIANTS[row["variant"]][1]
        for seed, path in row["configs"].items():
            # The config each run resolved holds the variant's overrides and its seed.
            resolved = yaml.safe_load(open(path))
            for override in row["overrides"]:
                key, value = override.split("=", 1)
                section, name = key.split(".")
                assert resolved[section][name] == yaml.safe_load(value), override
            assert resolved["train"]["seed"] == int(seed)
        assert all(0 <= row["mean"][name] <= 1 for name in RETRIEVAL_METRICS)
        assert row["mean"]["samples_per_s"] > 0
    # Two seeds of the same variant differ (the spread is real), and the caption runs trained without the terms
    # the common overrides switched on.
    assert rows[0]["per_seed"]["0"]["caption_loss"] != rows[0]["per_seed"]["1"]["caption_loss"]
    for seed in ("0", "1"):
        metrics = [json.loads(line) for line in open(out / "caption" / f"seed{seed}" / "metrics.jsonl")]
        assert metrics and not any("itc" in m or "supcon" in m for m in metrics)
    table = (out / "ablation.md").read_text().splitlines()
    header_at = next(index for index, line in enumerate(table) if line.startswith("| variant"))
    header, separator = table[header_at], table[header_at + 1]
    body = [line for line in table if line.startswith(("| caption", f"| {STATIC_FOLD}"))]
    assert len(body) == 2 and all(line.count("|") == header.count("|") == separator.count("|") for line in body)
    assert json.loads((out / "ablation.json").read_text())["rows"] == [*rows, static]

    # A rerun reuses every finished run (no run is trained again); under other common overrides it refuses to.
    logs_before = {path: path.stat().st_mtime_ns for path in out.glob("*/seed*.log")}
    again = main(["--config", str(TINY_CONFIG), "--variants", "caption", "--seeds", "0,1", "--ranks", "1",
                  "--out", str(out), "--no-prepare", *common])
    assert again["rows"][0]["per_seed"] == rows[0]["per_seed"]
    assert {path: path.stat().st_mtime_ns for path in out.glob("*/seed*.log")} == logs_before and logs_before
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(TINY_CONFIG), "--variants", "caption", "--seeds", "0", "--ranks", "1", "--out", str(out),
              "--no-prepare", *[item for item in common if not item.startswith("train.max_steps=")], "train.max_steps=4"])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message
    assert len([line for line in message.splitlines() if "other settings: train.max_steps (3 there, 4 now)" in line]) == 1


def test_an_out_holding_other_files_is_refused_before_any_run(tmp_path, capsys):
    from launcher.ablate import main

    out = tmp_path / "results"
    out.mkdir()
    (out / "paper_table.md").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(TINY_CONFIG), "--variants", "caption", "--out", str(out), "--no-prepare", f"root={tmp_path}"])
    assert exited.value.code == 2 and "not an earlier output of launcher.ablate" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["paper_table.md"]


def write_question_features(folder, num_shards: int = 3, per_shard: int = 40, dim: int = 32):
    """Demo-like tiny features processed with the synthetic paraphraser: every sample a scene with a
    question (10 answers; colour questions "other", existence questions "yes/no"), every fourth a
    question only (its caption dropped by the filter), captions and questions with their paraphrases,
    stats recording the paraphrase settings of process.paraphraser=synthetic."""
    import numpy as np
    import webdataset as wds

    from data_ingest.process.paraphrase import paraphrase_signature
    from data_ingest.sources.synthetic import COLORS, SHAPES, alternative_phrasings, scene_caption
    from vlpdist.atomic import atomic_write_json
    from vlpdist.config import load_config
    from vlpdist.data.feature_format import encode_feature_sample, write_label_vocabulary

    signature = paraphrase_signature(load_config(TINY_CONFIG, ["process.paraphraser=synthetic"]).process)
    rng = np.random.default_rng(0)
    colours, shapes = list(COLORS), list(SHAPES)
    folder.mkdir(parents=True, exist_ok=True)
    write_label_vocabulary(folder, shapes)
    question_only = 0
    for shard in range(num_shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
            for index in range(per_shard):
                colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
                caption = scene_caption(((colour, shape),))
                if index % 3:
                    qa = {"question": f"what color is the {shape}?", "answers": [colour] * 9 + ["red"],
                          "question_type": "what color is the", "answer_type": "other"}
                else:
                    qa = {"question": f"is there a {shape}?", "answers": ["yes"] * 10,
                          "question_type": "is there a", "answer_type": "yes/no"}
                only = index % 4 == 0 and shard < num_shards - 1  # the held-out shard keeps its captions
                question_only += only
                unit_D = rng.standard_normal(dim)
                unit_D /= np.linalg.norm(unit_D)
                writer.write(encode_feature_sample(
                    f"{shard:05d}{index:04d}", unit_D, unit_D[None], [] if only else [caption], [shapes.index(shape)], [shape],
                    {}, "question_only" if only else "keep_web", "", caption, qa,
                    caption_paraphrases=None if only else [alternative_phrasings(caption, 3)],
                    question_paraphrases=alternative_phrasings(qa["question"], 3)))
        atomic_write_json(folder / f"{shard:05d}_stats.json", {"shard": f"{shard:05d}", "written": per_shard, "paraphrase": signature})
    return folder, question_only


def test_captions_only_row_trains_no_question_and_the_table_shows_vqa(tmp_path, tiny_lm):
    """One seed of captions_only (a real one-rank run) on paraphrased question features: it trains on
    the training shards without their question-only samples and answers no question in training, yet
    answers the held-out questions, and the table carries VQA columns."""
    from launcher.ablate import CAPTIONS_ONLY_FEATURES, VARIANTS, VQA, main
    from vlpdist.data.feature_format import iterate_feature_shards

    features, question_only = write_question_features(tmp_path / "features")
    common = [f"root={tmp_path}", f"train.features_dir={features}", f"model.lm_name={tiny_lm}", "train.max_steps=3",
              "train.checkpoint_every=3", "train.log_every=1", "train.eval_max_samples=16", "align.bank_size=32",
              "train.ep_size=1", "train.question_fraction=0.5"]
    out = tmp_path / "ablation"
    result = main(["--config", str(TINY_CONFIG), "--variants", "captions_only", "--seeds", "0",
                   "--ranks", "1", "--out", str(out), "--no-prepare", *common])
    (captions_only,) = result["rows"]
    copy = out / CAPTIONS_ONLY_FEATURES
    # The copy: training shards without question-only samples (stats counting what is left), held-out unchanged.
    kept = {shard: [sample.key for sample in iterate_feature_shards(str(copy / f"{shard}.tar"))] for shard in ("00000", "00001", "00002")}
    assert question_only == 20 and len(kept["00000"]) + len(kept["00001"]) == 80 - question_only
    assert all(json.loads((copy / f"{shard}_stats.json").read_text())["written"] == len(keys) for shard, keys in kept.items())
    assert all(sample.captions for shard in ("00000", "00001") for sample in iterate_feature_shards(str(copy / f"{shard}.tar")))
    assert (copy / "00002.tar").read_bytes() == (features / "00002.tar").read_bytes()
    assert captions_only["overrides"] == [*VARIANTS["captions_only"][1], f"train.features_dir={copy}"]
    resolved = yaml.safe_load(open(captions_only["configs"]["0"]))
    assert resolved["train"]["features_dir"] == str(copy) and resolved["train"]["question_fraction"] == 0
    # No question was trained: the answer loss is 0 at every step (a question-only sample in a batch, as
    # 1 in 4 of the source's training samples is, would have trained as its question).
    steps = [json.loads(line) for line in open(out / "captions_only" / "seed0" / "metrics.jsonl") if '"ans"' in line]
    assert len(steps) == 3 and all(step["ans"] == 0 for step in steps)
    assert {VQA, f"{VQA} other", f"{VQA} yes/no"} <= set(captions_only["mean"]) and 0 <= captions_only["mean"][VQA] <= 100
    table = (out / "ablation.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| variant"))
    assert f"| {VQA} | {VQA} yes/no | {VQA} other |" in header and f"| {VQA} vs caption |" in header
    (body,) = [line for line in table if line.startswith("| captions_only")]
    assert body.count("|") == header.count("|") and f"{captions_only['mean'][VQA]:.1f} ± 0.0" in body
    assert any("question_fraction=0.5" in line for line in table)  # the note on reading the question rows


def test_question_group_resolves_and_refuses_shards_without_paraphrases(tmp_path, capsys):
    """The questions group names the caption row and the three question rows; their overrides resolve; a
    paraphrase row on shards not processed with the paraphraser is refused before any run."""
    from launcher.ablate import GROUPS, VARIANTS, check_processed_for, main, processing_overrides
    from vlpdist.config import load_config

    assert GROUPS["questions"] == ["caption", "captions_only", "paraphrase_captions", "paraphrase_questions"]
    assert not set(GROUPS["questions"][1:]) & set(GROUPS["default"])  # the default ablation costs what it did
    assert processing_overrides(GROUPS["questions"]) == ["process.paraphraser=synthetic"]
    expected = {"captions_only": ("train", "question_fraction", 0.0), "paraphrase_captions": ("train", "paraphrase_targets", "captions"),
                "paraphrase_questions": ("train", "paraphrase_targets", "questions")}
    for name, (section, key, value) in expected.items():
        config = load_config(TINY_CONFIG, VARIANTS[name][1])
        assert getattr(getattr(config, section), key) == value
        assert config.align.itc_weight == config.align.supcon_weight == 0  # against caption: one change each
    features = tiny_features(tmp_path / "features", num_shards=2, samples_per_shard=8)
    out = tmp_path / "ablation"
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(TINY_CONFIG), "--variants", "paraphrase_captions", "--seeds", "0", "--ranks", "1",
              "--out", str(out), "--no-prepare", f"root={tmp_path}", f"train.features_dir={features}"])
    message = capsys.readouterr().err
    assert exited.value.code == 2 and "variant paraphrase_captions trains paraphrases, but 2 shards" in message
    assert not (out / "paraphrase_captions").exists()
    # Shards processed with the synthetic paraphraser pass (the paraphrase rows' real runs are the loader's tests).
    paraphrased, _ = write_question_features(tmp_path / "paraphrased", num_shards=2, per_shard=8)
    for name in ("paraphrase_captions", "paraphrase_questions"):
        check_processed_for(name, load_config(TINY_CONFIG, [f"train.features_dir={paraphrased}", *VARIANTS[name][1]]))


@pytest.mark.parametrize("targets", ["captions", "questions", "both"])
def test_paraphrase_targets_swap_only_the_named_kind(targets):
    from vlpdist.config import load_config
    from vlpdist.data.feature_shards import QuestionSampling, choose_paraphrases
    from vlpdist.errors import UserError

    samples = [{"key": f"{index:05d}", "caption": f"caption {index}", "caption_paraphrases": [f"caption {index} again"],
                "question_paraphrases": [f"question {index} again"]} for index in range(8)]
    questions = [f"question {index}" if index % 2 else None for index in range(8)]
    sampling = QuestionSampling(0.5, "most_common", 0, paraphrase_prob=1.0, paraphrase_targets=targets)
    captions, asked, paraphrased = choose_paraphrases(samples, questions, sampling, epoch=0)
    for index in range(8):
        is_question = index % 2 == 1
        swapped = targets == "both" or targets == ("questions" if is_question else "captions")
        assert paraphrased[index] == swapped
        if is_question:
            assert asked[index] == (f"question {index} again" if swapped else f"question {index}")
            assert captions[index] == f"caption {index}"  # a question row's caption is not what its LM is taught
        else:
            assert asked[index] is None
            assert captions[index] == (f"caption {index} again" if swapped else f"caption {index}")
    assert load_config(None, [f"train.paraphrase_targets={targets}"]).train.paraphrase_targets == targets
    with pytest.raises(UserError, match="train.paraphrase_targets"):
        load_config(None, ["train.paraphrase_targets=answers"])
