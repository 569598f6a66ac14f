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
