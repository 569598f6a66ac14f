"""Runs and exports are portable (finding T5): a run whose config holds paths relative to the folder it
was started from exports from any working directory, and the export holds what it needs (a local
LM folder and CLIP checkpoint are copied in by default), so a copy of it captions on "another
machine" after the run, the LM and the CLIP are gone; a hub-named LM or CLIP tag loads at the
revision the export recorded."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from export_fixtures import trained_run
from test_caption_cli import expected_caption, jpeg_bytes, run_caption

from launcher.export import main as export_main
from vlpdist.config import load_config, load_run_config
from vlpdist.errors import UserError
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


# A hub name is pinned: the export loads the commit it recorded, not whatever the hub's `main` is later.
# The hub here is a real huggingface_hub cache layout (models--org--name/refs, snapshots/<commit>),
# read offline by transformers and open_clip exactly as a machine with a populated cache reads it.

TRAINED_COMMIT = hashlib.sha1(b"the upload the model was trained with").hexdigest()
LATER_COMMIT = hashlib.sha1(b"a later upload to the same repo").hexdigest()


def hub_repo(hub: Path, repo_id: str) -> Path:
    return hub / f"models--{repo_id.replace('/', '--')}"


def point_main_at(repo: Path, commit: str) -> None:
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def use_hub_cache(monkeypatch, hub: Path) -> None:
    """Make `hub` the hub cache for this test. Both libraries read HF_HUB_CACHE at import, so the
    settings are changed where they are kept: huggingface_hub's (read at each call), and the copy
    transformers 4.x keeps of it (TRANSFORMERS_CACHE; 5.x reads huggingface_hub's). HF_HUB_OFFLINE=1: conftest."""
    import transformers.utils.hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(hub), raising=False)


def save_later_upload(tiny_lm: Path, snapshot: Path) -> None:
    """What the repo's owner pushed after training: other weights and a tokenizer with one more token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.add_tokens(["<added-later>"])
    lm.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for param in lm.parameters():
            param.add_(0.5)
    lm.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)


def test_a_hub_named_lm_loads_at_the_revision_its_export_recorded(tmp_path, tiny_lm, tiny_clip, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlpdist.models.captioner import load_exported_captioner

    repo_id = "vlpdist-test/tiny-lm"
    repo = hub_repo(tmp_path / "hub", repo_id)
    shutil.copytree(tiny_lm, repo / "snapshots" / TRAINED_COMMIT)
    save_later_upload(Path(tiny_lm), repo / "snapshots" / LATER_COMMIT)
    point_main_at(repo, TRAINED_COMMIT)
    use_hub_cache(monkeypatch, tmp_path / "hub")

    checkpoint, _ = trained_run(tmp_path / "run", Path(tiny_lm), Path(tiny_clip), tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"), f"model.lm_name={repo_id}"])
    lm_entry = read_export_manifest(tmp_path / "export")["lm"]
    assert lm_entry == {"source": "reference", "tuned": False, "name": repo_id, "tokenizer": repo_id,
                        "revision": TRAINED_COMMIT, "tokenizer_revision": TRAINED_COMMIT}

    point_main_at(repo, LATER_COMMIT)  # the cache was refreshed after the export: `main` is another model now
    captioner = load_exported_captioner(tmp_path / "export")
    trained_lm = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert len(captioner.tokenizer) == len(AutoTokenizer.from_pretrained(tiny_lm))
    assert all(torch.equal(loaded, trained) for loaded, trained in
               zip(captioner.lm.state_dict().values(), trained_lm.state_dict().values(), strict=True))

    # The recorded commit gone from the cache (offline): refused in one line, never `main` instead.
    shutil.rmtree(repo / "snapshots" / TRAINED_COMMIT)
    with pytest.raises(UserError, match=f"at revision {TRAINED_COMMIT}"):
        load_exported_captioner(tmp_path / "export")


def test_a_clip_tag_resolves_to_its_weights_at_the_recorded_revision(tmp_path, monkeypatch):
    """open_clip's `create_model` fetches a tag at `main`; the export's CLIP is given the file at the recorded
    commit instead (which `create_model` loads as a checkpoint file). The files here are stand-ins: only
    which one is chosen is checked, building RN50 from them is open_clip's own file path."""
    from open_clip import get_pretrained_cfg

    from vlpdist.models.clip_identity import resolve_clip_checkpoint

    repo_id = get_pretrained_cfg("RN50", "openai")["hf_hub"].strip("/")  # timm/resnet50_clip.openai
    repo = hub_repo(tmp_path / "hub", repo_id)
    for commit in (TRAINED_COMMIT, LATER_COMMIT):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "open_clip_model.safetensors").write_text(commit)
    point_main_at(repo, LATER_COMMIT)
    use_hub_cache(monkeypatch, tmp_path / "hub")

    identity = {"model_name": "RN50", "pretrained": "openai", "pretrained_kind": "tag", "revision": TRAINED_COMMIT}
    weights = Path(resolve_clip_checkpoint(identity, tmp_path))
    assert weights.read_text() == TRAINED_COMMIT and weights.parent.name == TRAINED_COMMIT
    assert resolve_clip_checkpoint({**identity, "revision": None}, tmp_path) == "openai"  # nothing pinned: open_clip's own way
    with pytest.raises(UserError, match=f"hub revision {'0' * 40} of {repo_id}"):
        resolve_clip_checkpoint({**identity, "revision": "0" * 40}, tmp_path)
