"""Checkpoints never lose progress (finding T9): retention never prunes the tag just written (the one
`latest` names); `train.resume=false` over existing checkpoints is refused unless `train.overwrite=true`,
which removes only the checkpoint tags and `latest`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from common_fixtures import REPO, free_port
from train_fixtures import TINY_CONFIG, run_train_main

from vlpdist.train.checkpoint import remove_checkpoint_tags, tags_to_prune

WORKER = REPO / "tests" / "checkpoint_retention_worker.py"


def test_retention_keeps_the_tag_just_written_over_a_damaged_newer_one(tmp_path):
    """A real one-rank DeepSpeed engine: step 200 damaged, the run restarts and saves step 50 with keep 1."""
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "checkpoints")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    left = json.loads(result.stdout.strip().splitlines()[-1])
    assert left == {"tags": ["step_00000050"], "latest": "step_00000050", "resumed_step": 50}


def test_tags_to_prune_never_holds_the_written_tag():
    newest_first = ["step_00000300", "step_00000200", "step_00000100"]
    assert tags_to_prune(newest_first, "step_00000300", 2) == ["step_00000100"]
    assert tags_to_prune(newest_first, "step_00000100", 2) == ["step_00000200"]
    assert tags_to_prune(newest_first, "step_00000100", 1) == ["step_00000300", "step_00000200"]
    assert tags_to_prune(newest_first, "step_00000200", 0) == ["step_00000300", "step_00000100"]


def test_resume_false_over_checkpoints_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000005").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000005")
    # The refusal comes before the features are read: a missing features folder would be the next error.
    args = ["--config", str(TINY_CONFIG), "train.ep_size=1", f"train.output_dir={run_dir}", "train.resume=false",
            f"train.features_dir={tmp_path / 'no_features'}"]
    result = run_train_main(args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "train.resume=false but" in lines[0] and "train.overwrite=true" in lines[0]
    assert (run_dir / "checkpoints" / "step_00000005").is_dir()
    overwrite = run_train_main([*args, "train.overwrite=true"])
    assert overwrite.returncode == 2 and "feature folder" in overwrite.stderr  # allowed past the check


def test_overwrite_removes_only_checkpoint_tags_and_latest(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step_00000005", "step_00000010", ".tmp_step_00000015", "step_notes", "mine"):
        (checkpoints / name).mkdir(parents=True)
    (checkpoints / "latest").write_text("step_00000010")
    (checkpoints / "step_00000020.txt").write_text("a user's file")
    assert remove_checkpoint_tags(checkpoints) == [".tmp_step_00000015", "latest", "step_00000005", "step_00000010"]
    assert sorted(path.name for path in checkpoints.iterdir()) == ["mine", "step_00000020.txt", "step_notes"]
