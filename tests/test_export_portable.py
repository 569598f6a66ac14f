"""Runs and exports are portable (finding T5): a run whose config holds paths relative to the folder it
was started from exports from any working directory, and the export holds what it needs (a local
LM folder and CLIP checkpoint are copied in by default), so a copy of it captions on "another
machine" after the run, the LM and the CLIP are gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from export_fixtures import trained_run
from test_caption_cli import expected_caption, jpeg_bytes, run_caption

from launcher.export import main as export_main
from vlpdist.config import load_config, load_run_config
from vlpdist.models.export_bundle import read_export_manifest

# Building the session's tiny LM, then one caption subprocess (~6 s).
pytestmark = pytest.mark.slow


def test_a_copied_export_captions_after_the_run_and_its_files_are_deleted(tmp_path, tiny_lm, tiny_clip, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_lm, work / "lm")
    shutil.copytree(Path(tiny_clip).parent, work / "clip")
    monkeypatch.chdir(work)
    trained_run(Path("run"), Path("lm"), Path("clip") / Path(tiny_clip).name, tuned=False)
    saved = load_config(work / "run" / "config.yaml")
    assert saved.model.lm_name == "lm" and saved.base_dir == str(work)  # relative, as the user typed it

    monkeypatch.chdir(tmp_path)  # another working directory: the run's relative paths resolve against the run's
    assert load_run_config(work / "run" / "config.yaml").model.lm_name == str(work / "lm")
    export_main(["--checkpoint", str(work / "run" / "export" / "model_fp32.safetensors"), "--out", str(tmp_path / "export")])
    manifest = read_export_manifest(tmp_path / "export")
    assert manifest["lm"]["source"] == "bundled" and manifest["clip"]["pretrained"] == "clip/tiny_clip.pt"
    photo = jpeg_bytes(0)
    expected = expected_caption(tmp_path / "export", photo)

    copy = tmp_path / "other_machine" / "export"
    shutil.copytree(tmp_path / "export", copy)
    for written_here in (work, tmp_path / "export"):
        shutil.rmtree(written_here)
    (tmp_path / "photo.jpg").write_bytes(photo)
    result = run_caption("--export", str(copy), str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "rows.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["status"] == "ok" and row["caption"] == expected
