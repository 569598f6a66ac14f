"""`python -m launcher.demo` end to end at a small size, as a user runs it: the summary's numbers
add up and lie in range, a rerun reuses every stage and says so, the caption command it
prints captions the sample images it wrote, and the run report it writes is named among them. Also `--fresh`'s removal, which touches only the
demo's own outputs under the root."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from common_fixtures import REPO

from launcher.demo import SAMPLE_IMAGES, STAGE_OUTPUTS, fold_note, remove_stage_outputs
from launcher.demo import main as demo_main
from vlpdist.errors import UserError

SMALL = [
    "demo.num_samples=240",            # + 12 broken URLs = 252 rows
    "download.samples_per_shard=63",   # 4 shards, the last held out
    "process.demo_clip_epochs=4",
    "demo.lm_steps=50",                # the LM's quality is not what this test checks (200 steps: a minute of 2 cores)
    # A CLIP pretrained for seconds on ~140 pairs scores every pair below the full demo's threshold (0.65, and
    # even 0.3): the filter keeps all here (a cosine is >= -1), and is still scored against the known noise.
    "process.clip_threshold=-1.0",
    "train.max_steps=30",
    "train.warmup_steps=5",
]


def run_demo(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.demo", *extra, f"root={root}", *SMALL], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def printed_commands(stdout: str) -> list[str]:
    """The commands under the closing "try next:" line."""
    tail = stdout.split("try next:", 1)[1]
    return [line.strip() for line in tail.splitlines() if line.startswith("    ")]


@pytest.mark.slow
def test_demo_small_end_to_end_rerun_and_caption_command(tmp_path):
    root = tmp_path / "demo"
    first = run_demo(root, "--fresh")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((root / "summary.json").read_text())
    download, process, evaluation, export = summary["download"], summary["process"], summary["train"], summary["export"]

    # Every URL row ends in exactly one state; every downloaded image is written, dropped or failed.
    assert download["input_rows"] == 252
    assert download["success"] + sum(download["failures_by_reason"].values()) == download["input_rows"]
    assert download["failures_by_reason"] and download["success"] == 240
    assert process["raw_samples"] == download["success"]
    assert process["written"] + process["dropped_by_filter"] + sum(process["failed"].values()) == process["raw_samples"]
    truth = process["filter_vs_truth"]
    assert 0.0 <= truth["precision"] <= 1.0 and 0.0 <= truth["recall"] <= 1.0
    assert truth["tp"] + truth["fp"] + truth["fn"] + truth["tn"] == truth["samples_scored"]
    assert evaluation["samples"] > 0 and evaluation["caption_loss"] > 0 and evaluation["lm_without_image_loss"] > 0
    for scores in (evaluation["metrics"], evaluation["most_frequent_caption_metrics"]):
        assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(scores)
        assert all(0.0 <= value <= 1.0 for name, value in scores.items() if name != "CIDEr") and scores["CIDEr"] >= 0.0
    assert all(0.0 <= value <= 1.0 for value in evaluation["retrieval"].values())
    assert export["fold_relative_error"] < 1e-4
    assert [row["batch"] for row in summary["latency"]] == [1, 64]
    assert all(row["moe_ms"] > 0 and row["folded_ms"] > 0 and row["moe_over_folded"] > 0 for row in summary["latency"])
    assert [stage["stage"] for stage in summary["stages"]] == ["download", "process", "train", "export"]
    assert not any(stage["reused"] for stage in summary["stages"])
    # One table, on the terminal and in summary.md, with a row per section.
    table = (root / "summary.md").read_text()
    for section in ("| ingestion", "| filter", "| captions", "| retrieval", "| fold", "| stage"):
        assert section in table
    assert "failed: http_404" in table and "most-frequent caption" in table and "LM without the image" in table
    assert "\n".join(line for line in table.splitlines() if line.startswith("|")) in first.stdout
    # The URL list's questions went through download, processing and training: VQA accuracy per
    # answer type and overall, beside the LM without the image and the most common training answer.
    vqa = evaluation["vqa"]
    assert vqa["questions"] > 0 and set(vqa["accuracy"]["per_answer_type"]) == {"yes/no", "number", "other"}
    for scored in (vqa["accuracy"], vqa["lm_without_image"], vqa["most_common_answer"]):
        assert 0.0 <= scored["accuracy"] <= 100.0 and sum(row["questions"] for row in scored["per_answer_type"].values()) == vqa["questions"]
    assert "| questions" in table and "VQA accuracy: yes/no" in table and "most common answer per question type" in table
    # The run report (launcher.report's page), written at the end and named in the output.
    report = root / "report.html"
    assert f"[demo] run report (open it in a browser): {report}" in first.stdout
    assert any(str(report) in command for command in printed_commands(first.stdout))
    page = report.read_text()
    for section in ("ingestion", "filter", "labels", "training", "heldout", "retrieval"):
        assert f'<section id="{section}" class="present"' in page, section

    second = run_demo(root)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage, evidence in (("download", "240 images in"), ("process", "samples in 4 shards"), ("train", "30 steps"),
                            ("export", str(root / "export"))):
        line = next(line for line in second.stdout.splitlines() if line.startswith(f"[demo] {stage}: "))
        assert line.startswith(f"[demo] {stage}: reused (") and evidence in line, line
    assert "[demo] language model" not in second.stdout and "training on" not in second.stdout
    rerun = json.loads((root / "summary.json").read_text())
    assert all(stage["reused"] for stage in rerun["stages"])
    assert rerun["train"]["metrics"] == evaluation["metrics"] and rerun["download"] == download

    commands = printed_commands(second.stdout)
    assert commands[0].startswith("tensorboard --logdir ")
    caption = next(command for command in commands if command.startswith("python -m launcher.caption"))
    result = subprocess.run([sys.executable, *shlex.split(caption)[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (root / "sample_captions.jsonl").read_text().splitlines()]
    assert len(rows) == SAMPLE_IMAGES and all(row["status"] == "ok" and row["caption"] for row in rows)
    assert sorted(Path(row["input"]).name for row in rows) == sorted(path.name for path in (root / "sample_images").iterdir())


def test_fresh_removes_only_the_demo_outputs_under_the_root(tmp_path):
    root = tmp_path / "demo"
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "00000.tar").write_bytes(b"x")
    (root / "summary.md").write_text("old")
    (root / "notes.txt").write_text("the user's")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (root / "features").symlink_to(elsewhere, target_is_directory=True)
    assert remove_stage_outputs(root) == ["raw", "features", "summary.md"]
    assert sorted(path.name for path in root.iterdir()) == ["notes.txt"]
    assert (elsewhere / "keep.txt").read_text() == "keep"  # the link went, not what it pointed at
    assert set(STAGE_OUTPUTS) >= {"raw", "features", "train", "export", "sample_images"}
    for refused in (Path.home(), REPO, Path("/")):
        with pytest.raises(UserError, match="--fresh refuses"):
            remove_stage_outputs(refused)


def test_a_root_holding_other_files_is_refused_untouched(tmp_path, capsys):
    """T1 for the demo: `root=` a folder the demo did not make is neither cleared by --fresh nor written into."""
    root = tmp_path / "data"
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "00000.tar").write_bytes(b"a user's archive")
    (root / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        demo_main(["--fresh", "--stages", "export", f"root={root}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "root= " in err and "not an earlier output of launcher.demo" in err
    assert sorted(path.name for path in root.iterdir()) == ["notes.txt", "raw"]
    assert (root / "raw" / "00000.tar").read_bytes() == b"a user's archive"


def test_the_fold_note_reports_the_measured_error():
    note = fold_note(1.2e-7, 1e-4)
    assert "measured 1.2e-07" in note and "float32 rounding" in note and "1e-04" in note and "exact" not in note
    assert "above float32 rounding" in fold_note(3.4e-5, 1e-4) and "3.4e-05" in fold_note(3.4e-5, 1e-4)
