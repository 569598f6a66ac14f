"""The held-out evaluation's references: the web captions CapFilt kept, BLIP's synthetic ones kept
apart, and every reference embedded for retrieval as the forward embeds a caption."""

from __future__ import annotations

import numpy as np
import torch
from eval_fixtures import CAPFILT_SAMPLES, capfilt_shard

from vlpdist.config import AlignConfig, ModelConfig
from vlpdist.data.feature_format import iterate_feature_shards
from vlpdist.data.feature_shards import web_caption_count
from vlpdist.models.captioner import build_captioner
from vlpdist.train.evaluate import evaluate_heldout, merge_shares


def test_web_caption_count_follows_the_capfilt_decision():
    assert web_caption_count("keep_web", ["web"]) == 1
    assert web_caption_count("keep_web_and_synthetic", ["web", "blip 1", "blip 2"]) == 1
    assert web_caption_count("keep_synthetic", ["blip 1"]) == 0
    # Shards of another tool carry no decision: nothing marks a caption synthetic.
    assert web_caption_count("", ["one", "two"]) == 2


def test_heldout_references_are_web_captions_each_embedded(tmp_path, tiny_lm):
    shard = capfilt_shard(tmp_path / "00000.tar", dim=16)
    torch.manual_seed(0)
    captioner = build_captioner(ModelConfig(lm_name=str(tiny_lm), mapper="mlp", prefix_length=3, max_caption_tokens=12), 16,
                                align=AlignConfig(itc_weight=0.1, embed_dim=8, text_target="clip")).eval()
    heldout = merge_shares([evaluate_heldout(captioner, [shard], 2, 3, 4, torch.device("cpu"))])
    assert heldout["references"] == {key: web for key, web, _ in CAPFILT_SAMPLES}
    assert heldout["synthetic_references"] == {key: synthetic for key, _, synthetic in CAPFILT_SAMPLES}
    # Retrieval's text side: the text head over each web reference's own CLIP text embedding.
    for sample in iterate_feature_shards(str(shard)):
        web = heldout["references"][sample.key]
        if not web:  # not in retrieval (`vlpdist.eval.scoring.heldout_retrieval`)
            continue
        expected = captioner.heads.text_embed(torch.from_numpy(sample.text_embeddings[:len(web)].astype(np.float32)))
        visual, text = heldout["embeddings"][sample.key]
        assert text.shape == (len(web), 8) and torch.allclose(text, expected.detach(), atol=1e-6)
        assert visual.shape == (8,)
