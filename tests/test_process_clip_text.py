"""Text features with the padding cut off equal open_clip's own `encode_text` over the full context."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from data_ingest.process.clip_model import encode_texts, load_clip, text_padding_is_inert
from process_fixtures import TINY_CLIP, TINY_CLIP_CONFIG

CAPTIONS = [
    "a red circle",
    "a blue star left of a green square",
    "",  # only start and end tokens
    "a purple diamond, an orange triangle and a yellow circle from left to right on a speckled background "
    "with some words past the end of the context that the tokenizer cuts off",
]


def _full_context_features(model, tokenizer, texts):
    with torch.no_grad():
        return model.encode_text(tokenizer(texts), normalize=True).numpy()


def test_trimmed_text_features_equal_full_context(tiny_clip):
    model, _, tokenizer = load_clip(TINY_CLIP, str(tiny_clip))
    assert text_padding_is_inert(model)
    tokens = tokenizer(CAPTIONS[:2])
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # there is padding to cut
    for texts in (CAPTIONS[:1], CAPTIONS[:2], CAPTIONS[:3], CAPTIONS):
        ours = encode_texts(model, tokenizer, texts, "cpu")
        reference = _full_context_features(model, tokenizer, texts)
        assert ours.shape == reference.shape == (len(texts), TINY_CLIP_CONFIG["embed_dim"])
        assert abs(ours - reference).max() < 1e-5


@pytest.mark.parametrize("text_change, inert", [
    ({"pool_type": "eos", "eos_id": 49407}, True),  # pooled at the tokenizer's end-of-text id
    ({"no_causal_mask": True}, False),  # every position sees the padding: full context kept
    ({"pool_type": "last"}, False),  # pooled at the last position, which trimming would move
])
def test_other_text_towers(tmp_path, text_change, inert):
    name = f"vlpdist-test-clip-{'-'.join(text_change)}"
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["text_cfg"].update(text_change)
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    tokenizer = open_clip.get_tokenizer(name)
    assert text_padding_is_inert(model) is inert
    ours = encode_texts(model, tokenizer, CAPTIONS, "cpu")
    assert abs(ours - _full_context_features(model, tokenizer, CAPTIONS)).max() < 1e-5
