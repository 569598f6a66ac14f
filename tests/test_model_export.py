"""`launcher.export`: consolidated checkpoint -> export folder whose folded mapper reloads and matches the MoE
(the LM and CLIP records of the export: tests/test_export_bundle.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common_fixtures import REPO
from safetensors.torch import save_file

from launcher.export import main as export_main
from vlpdist.atomic import OUTPUT_MARKER
from vlpdist.config import Config, ModelConfig, save_config
from vlpdist.models import build_mapper, load_folded_mapper

CLIP_DIM, WIDTH = 12, 16
MODEL = ModelConfig(prefix_length=3, mapper_depth=2, num_experts=4, top_k=2, kernel_sizes=[1, 3])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as training leaves it: config.yaml + a consolidated fp32 checkpoint of the whole captioner."""
    torch.manual_seed(0)
    mapper = build_mapper(MODEL, CLIP_DIM, WIDTH)
    with torch.no_grad():
        for param in mapper.parameters():
            param.add_(0.2 * torch.randn_like(param))
    state = {f"mapper.{key}": value for key, value in mapper.state_dict().items()}
    # A frozen LM is not in the consolidated state (training leaves it out): the export names it.
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "consolidated.pt")
    save_file(state, str(tmp_path / "checkpoints" / "model_fp32.safetensors"))
    save_config(Config(model=MODEL), tmp_path)
    torch.save(mapper.state_dict(), tmp_path / "mapper_only.pt")
    return tmp_path


@pytest.mark.parametrize("checkpoint", ["consolidated.pt", "model_fp32.safetensors"])
def test_export_writes_folded_mapper_that_matches_the_moe(run_dir, capsys, checkpoint):
    report = export_main(["--checkpoint", str(run_dir / "checkpoints" / checkpoint), "--out", str(run_dir / "export")])
    export = run_dir / "export"
    assert {p.name for p in export.iterdir()} == {"mapper.safetensors", "mapper_config.json", "config.yaml", "clip", "export.json",
                                                  OUTPUT_MARKER}
    manifest = json.loads((export / "export.json").read_text())
    # A hub LM is named, pinned to the hub cache's commit when there is one (none offline here).
    assert manifest["lm"] == {"source": "reference", "tuned": False, "name": "gpt2", "tokenizer": "gpt2",
                              "revision": None, "tokenizer_revision": None}
    assert manifest["clip"]["model_name"] == "ViT-B-32" and manifest["clip"]["pretrained_kind"] == "tag"
    assert manifest["clip"]["preprocess"]["size"] == [224, 224] and (export / manifest["clip"]["model_config"]).is_file()
    assert set(manifest["files"]) == {"mapper.safetensors", "mapper_config.json", "config.yaml", "clip/ViT-B-32.json"}
    printed = capsys.readouterr().out
    assert f"{report['moe_params']:,}" in printed and f"{report['folded_params']:,}" in printed
    assert report["folded_params"] < report["moe_params"]  # branches merged, identity absorbed
    assert report["fold_relative_error"] < 1e-5
    config = json.loads((run_dir / "export" / "mapper_config.json").read_text())
    assert config["model"]["lm_name"] == "gpt2" and config["folded_mapper"]["num_experts"] == 4

    moe = build_mapper(MODEL, CLIP_DIM, WIDTH)
    moe.load_state_dict(torch.load(run_dir / "mapper_only.pt", weights_only=True))
    folded = load_folded_mapper(run_dir / "export")
    clip_BC = torch.randn(7, CLIP_DIM)
    with torch.no_grad():
        expected = moe.eval()(clip_BC)[0]
        actual = folded(clip_BC)[0]
    assert float((actual - expected).norm() / expected.norm()) < 1e-5


def test_tuned_lm_missing_from_checkpoint_is_refused(run_dir):
    save_config(Config(model=dataclasses.replace(MODEL, freeze_lm=False)), run_dir)
    with pytest.raises(SystemExit) as exited:
        export_main(["--checkpoint", str(run_dir / "checkpoints" / "model_fp32.safetensors"), "--out", str(run_dir / "export")])
    assert exited.value.code == 2 and not (run_dir / "export").exists()


def test_out_holding_the_checkpoint_is_refused(run_dir, capsys):
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(run_dir / "checkpoints" / "model_fp32.safetensors"), "--out", str(run_dir / "checkpoints")])
    assert "would be replaced" in capsys.readouterr().err and (run_dir / "checkpoints" / "model_fp32.safetensors").is_file()


def test_out_holding_other_files_is_refused_and_an_earlier_export_replaced(run_dir, capsys):
    """T1: `--out mymodels` holding the user's files is refused untouched; an earlier export is replaced."""
    checkpoint = str(run_dir / "checkpoints" / "model_fp32.safetensors")
    mymodels = run_dir / "mymodels"
    (mymodels / "other_model").mkdir(parents=True)
    (mymodels / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        export_main(["--checkpoint", checkpoint, "--out", str(mymodels)])
    assert exited.value.code == 2 and "not an earlier output of launcher.export" in capsys.readouterr().err
    assert sorted(p.name for p in mymodels.iterdir()) == ["notes.txt", "other_model"]
    export_main(["--checkpoint", checkpoint, "--out", str(run_dir / "export")])
    (run_dir / "export" / "stale.txt").write_text("left by the earlier export's run")
    export_main(["--checkpoint", checkpoint, "--out", str(run_dir / "export")])
    assert not (run_dir / "export" / "stale.txt").exists() and (run_dir / "export" / "mapper.safetensors").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".export.")]


def test_fold_error_above_the_tolerance_is_refused(run_dir, capsys):
    """The measured exact-fold error (~1e-7 here) is checked: under a tolerance below it, nothing is written."""
    checkpoint = str(run_dir / "checkpoints" / "model_fp32.safetensors")
    with pytest.raises(SystemExit) as exited:
        export_main(["--checkpoint", checkpoint, "--out", str(run_dir / "export"), "--max-fold-error", "1e-12"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "above --max-fold-error 1e-12" in err and len(err.strip().splitlines()) == 1
    assert not (run_dir / "export").exists() and not [p for p in run_dir.iterdir() if p.name.startswith(".export")]
    report = export_main(["--checkpoint", checkpoint, "--out", str(run_dir / "export")])
    assert report["fold_tolerance"] == 1e-4 > report["fold_relative_error"]
    assert json.loads((run_dir / "export" / "export.json").read_text())["fold_tolerance"] == 1e-4


@pytest.mark.slow
def test_export_cli_user_errors_exit_2(run_dir):
    missing = subprocess.run(
        [sys.executable, "-m", "launcher.export", "--checkpoint", str(run_dir / "nope.pt"), "--out", str(run_dir / "x")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: checkpoint") and "Traceback" not in missing.stderr
    (run_dir / "garbage.pt").write_bytes(b"not a checkpoint")
    garbage = subprocess.run(
        [sys.executable, "-m", "launcher.export", "--checkpoint", str(run_dir / "garbage.pt"), "--out", str(run_dir / "x")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert garbage.returncode == 2 and "not a readable state dict" in garbage.stderr
    assert not (run_dir / "x").exists()
