"""The export is the trained model: `launcher.export` -> `load_exported_captioner` gives the trained
captioner's greedy captions (LM frozen, copied, or tuned), its bottleneck tokens and alignment
heads, and the CLIP the features came from; a partial export is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from export_fixtures import CLIP_DIM, heldout_features, trained_run
from process_fixtures import TINY_CLIP

from launcher.export import main as export_main
from vlpdist.config import ModelConfig
from vlpdist.errors import UserError
from vlpdist.models import load_exported_captioner
from vlpdist.models.captioner import PrefixCaptioner, load_language_model
from vlpdist.models.clip_identity import build_clip_image_encoder
from vlpdist.models.export_bundle import read_export_manifest

# Building the session's tiny LM takes ~10-20 s on 2 cores; each export round trip ~2 s.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tuned, copy_lm", [(False, False), (False, True), (True, False)], ids=["frozen-named", "frozen-copied", "tuned"])
def test_export_round_trip_captions_like_the_trained_model(tmp_path, tiny_lm, tiny_clip, tuned, copy_lm):
    checkpoint, trained = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=tuned)
    export_dir = tmp_path / "elsewhere" / "export"
    # A local frozen LM is copied by default; --no-copy-lm names it, as a hub LM is named.
    export_main(["--checkpoint", str(checkpoint), "--out", str(export_dir), *([] if copy_lm or tuned else ["--no-copy-lm"]),
                 "--no-copy-clip"])

    manifest = read_export_manifest(export_dir)
    if tuned or copy_lm:
        assert manifest["lm"]["source"] == "bundled" and manifest["lm"]["tuned"] == tuned
        assert (export_dir / "lm" / "config.json").is_file() and any(name.startswith("lm/tokenizer") for name in manifest["files"])
    else:
        assert manifest["lm"] == {"source": "reference", "tuned": False, "name": str(Path(tiny_lm).resolve()),
                                  "tokenizer": str(Path(tiny_lm).resolve()), "revision": None, "tokenizer_revision": None}
    assert manifest["clip"]["pretrained"] == str(Path(tiny_clip).resolve()) and manifest["clip"]["embed_dim"] == CLIP_DIM
    assert (manifest["extras"] == "extras.safetensors") == tuned

    loaded = load_exported_captioner(export_dir)
    clip_BC = heldout_features()
    assert loaded.generate_captions(clip_BC, 10) == trained.generate_captions(clip_BC, 10)
    # Greedy captions of tiny random models may all end at once (an EOS first): the caption loss
    # on fixed captions compares the whole model, every token's distribution.
    ids_BT, mask_BT = trained.tokenize(["a red circle left of a blue square"] * clip_BC.shape[0])
    with torch.no_grad():
        trained_loss = trained.eval()(clip_BC, ids_BT, mask_BT)["cap"]
        assert torch.allclose(loaded(clip_BC, ids_BT, mask_BT)["cap"], trained_loss, rtol=1e-5, atol=1e-6)
    if tuned:
        assert torch.equal(loaded.bottleneck, trained.bottleneck)
        for key, value in trained.heads.state_dict().items():
            assert torch.equal(loaded.heads.state_dict()[key], value), key
        # The base LM in place of the tuned one captions otherwise: a dropped LM would show.
        base = PrefixCaptioner(loaded.mapper, load_language_model(str(tiny_lm)), loaded.tokenizer, ModelConfig(**manifest["model"]))
        with torch.no_grad():
            base.bottleneck.copy_(loaded.bottleneck)
            assert not torch.allclose(base.eval()(clip_BC, ids_BT, mask_BT)["cap"], trained_loss, rtol=1e-3)


def test_clip_rebuilt_from_the_export_embeds_as_ingestion_did(tmp_path, tiny_lm, tiny_clip):
    from data_ingest.process.clip_model import encode_images, load_clip

    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])  # a local CLIP is copied by default
    manifest = read_export_manifest(tmp_path / "export")
    assert manifest["clip"]["pretrained"] == f"clip/{Path(tiny_clip).name}"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    model, preprocess = build_clip_image_encoder(manifest["clip"], tmp_path / "export")
    ingest_model, ingest_preprocess, _ = load_clip(TINY_CLIP, str(tiny_clip))
    assert torch.equal(preprocess(image), ingest_preprocess(image))
    ours = encode_images(model, preprocess(image)[None], "cpu")
    theirs = encode_images(ingest_model, ingest_preprocess(image)[None], "cpu")
    assert ours.shape == (1, CLIP_DIM) and np.array_equal(ours, theirs)


def test_partial_or_foreign_export_is_refused(tmp_path, tiny_lm, tiny_clip):
    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=True)
    complete = tmp_path / "export"
    export_main(["--checkpoint", str(checkpoint), "--out", str(complete)])

    def broken(name: str, damage) -> Path:
        folder = tmp_path / name
        shutil.copytree(complete, folder)
        damage(folder)
        return folder

    cases = {
        "no export.json": broken("no_manifest", lambda f: (f / "export.json").unlink()),
        "lm/model.safetensors is missing": broken("no_lm", lambda f: (f / "lm" / "model.safetensors").unlink()),
        "mapper.safetensors has 100 bytes": broken("short", lambda f: (f / "mapper.safetensors").write_bytes(b"\0" * 100)),
        "not a vlpdist export manifest": broken("consolidated_only", lambda f: (f / "export.json").write_text(
            json.dumps({"clip_dim": CLIP_DIM, "step": 3, "includes_lm": True}))),
    }
    for reason, folder in cases.items():
        with pytest.raises(UserError, match=reason) as refused:
            load_exported_captioner(folder)
        assert "\n" not in str(refused.value)


def test_failed_export_leaves_no_folder(tmp_path, tiny_lm, tiny_clip, capsys):
    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"), f"process.clip_pretrained={tmp_path}/nope.pt"])
    assert "nope.pt does not exist" in capsys.readouterr().err
    assert not any(tmp_path.glob("*export*"))
