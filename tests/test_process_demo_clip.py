"""The demo CLIP: trained with open_clip's ClipLoss, saved, and loaded back like a pretrained checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_ingest.demo_clip import DEMO_CLIP_MODEL, train_demo_clip
from data_ingest.process.clip_model import encode_images, encode_texts, load_clip
from process_fixtures import write_raw_shards
from vlpdist.config import load_config
from vlpdist.errors import UserError


@pytest.mark.slow
def test_train_save_and_load_through_open_clip(tmp_path):
    write_raw_shards(tmp_path, num_samples=48, per_shard=24)
    checkpoint = tmp_path / "clip" / f"{DEMO_CLIP_MODEL}.pt"
    config = load_config("configs/demo.yaml", [
        f"root={tmp_path}", f"process.clip_pretrained={checkpoint}", "process.demo_clip_epochs=2",
        "process.demo_clip_batch_size=16",
    ])
    assert train_demo_clip(config) == checkpoint
    assert (checkpoint.parent / f"{DEMO_CLIP_MODEL}.json").is_file()
    assert not [p for p in checkpoint.parent.iterdir() if ".tmp." in p.name]

    model, preprocess, tokenizer = load_clip(DEMO_CLIP_MODEL, str(checkpoint))
    saved = torch.load(checkpoint, weights_only=True)
    assert torch.equal(model.state_dict()["logit_scale"], saved["logit_scale"])
    from PIL import Image

    images = torch.stack([preprocess(Image.new("RGB", (64, 64), color)) for color in ("red", "blue")])
    image_BD = encode_images(model, images, "cpu")
    text_ND = encode_texts(model, tokenizer, ["a red circle", "a blue star left of a green square"], "cpu")
    assert image_BD.shape == (2, 64) and text_ND.shape == (2, 64)
    assert np.allclose(np.linalg.norm(image_BD, axis=1), 1.0, atol=1e-4)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_clip(DEMO_CLIP_MODEL, str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="knows no model"):
        load_clip("no-such-clip", "")
