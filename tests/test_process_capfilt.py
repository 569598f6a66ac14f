"""CapFilt with tiny random BLIP models saved locally and loaded by folder, like a hub checkpoint."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from data_ingest.process.capfilt import (
    apply_caption_policy,
    generate_captions,
    itm_probabilities,
    load_captioner,
    load_itm,
)
from process_fixtures import TINY_CLIP, save_tiny_blip, write_raw_shards
from vlpdist.config import ProcessConfig
from vlpdist.errors import UserError


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def _images():
    return [Image.new("RGB", (40, 40), (220, 30, 30)), Image.new("RGB", (48, 48), (40, 70, 220))]


def _pixels(processor, images):
    return processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)


def test_captioner_samples_n_captions_per_image(tiny_blip):
    model, processor = load_captioner(str(tiny_blip / "captioner"))
    captions = generate_captions(model, processor, _pixels(processor, _images()), num_captions=3, top_p=0.9,
                                 max_new_tokens=6, device="cpu")
    assert len(captions) == 2 and all(len(per_image) == 3 for per_image in captions)
    assert all(isinstance(text, str) for per_image in captions for text in per_image)
    assert any(text for per_image in captions for text in per_image)


def test_itm_encodes_each_image_once_and_equals_the_pairwise_forward(tiny_blip):
    """3 captions of image 0 and 2 of image 1: one vision pass over the 2 images, and the very
    probabilities of BLIP's own forward over the 5 (image, caption) pairs."""
    import torch

    model, processor = load_itm(str(tiny_blip / "itm"))
    images = _images()
    texts = ["a red circle", "the red square on the left", "a dog", "the blue square", "a green star with a cat"]
    vision_batches = []
    hook = model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: vision_batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    probabilities = itm_probabilities(model, processor, _pixels(processor, images), [3, 2], texts, "cpu")
    hook.remove()
    assert vision_batches == [2]
    pairs = processor(images=[images[0]] * 3 + [images[1]] * 2, text=texts, return_tensors="pt", padding=True,
                      truncation=True)
    with torch.no_grad():
        pairwise = torch.softmax(model(**pairs, use_itm_head=True).itm_score.float(), dim=-1)[:, 1].tolist()
    assert probabilities == pairwise
    assert all(0.0 <= p <= 1.0 for p in probabilities)


def test_missing_blip_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load BLIP"):
        load_itm(str(tmp_path / "no_such_model"))


@pytest.mark.parametrize(
    ("policy", "web_passes", "expected_kept", "expected_decision"),
    [
        ("web", True, ["web"], "keep_web"),
        ("web", False, [], "drop"),
        ("synthetic", True, ["s0", "s2"], "keep_synthetic"),
        ("web_and_synthetic", True, ["web", "s0", "s2"], "keep_web_and_synthetic"),
        ("web_and_synthetic", False, ["s0", "s2"], "keep_synthetic"),
        ("web_else_synthetic", True, ["web"], "keep_web"),
        ("web_else_synthetic", False, ["s0", "s2"], "keep_synthetic"),
    ],
)
def test_caption_policy(policy, web_passes, expected_kept, expected_decision):
    choice = apply_caption_policy(policy, "web", web_passes, ["s0", "s1", "s2"], [True, False, True])
    assert choice.kept == expected_kept
    assert choice.decision == expected_decision
    assert choice.web_kept == ("web" in expected_kept)


@pytest.mark.slow
def test_shard_with_captioner_and_itm_filter(tmp_path, tiny_blip, tiny_clip):
    """A whole shard through BLIP captioning + ITM filtering (no Ray: the task body itself)."""
    import torch

    from vlpdist.data.feature_format import iterate_feature_shards
    from data_ingest.process.shard import process_shard

    torch.manual_seed(0)  # the captioner samples: same captions whatever ran before in this session
    (raw,) = write_raw_shards(tmp_path, num_samples=6, per_shard=6)
    features = tmp_path / "features"
    # Threshold 0 lets every caption pass: the web caption and every non-empty synthetic one are kept.
    settings = ProcessConfig(
        clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip), captioner=str(tiny_blip / "captioner"),
        num_synthetic_captions=2, max_caption_tokens=6, filter="itm", itm_model=str(tiny_blip / "itm"),
        itm_threshold=0.0, caption_policy="web_and_synthetic", vocab="demo_shapes", batch_size=4,
    )
    stats = process_shard(str(raw), str(features), settings)
    assert stats["raw_samples"] == 6 and stats["written"] == 6
    samples = list(iterate_feature_shards(str(features / "00000.tar")))
    for sample in samples:
        synthetic = sample.scores["synthetic_captions"]  # the non-empty ones of the 2 sampled
        assert sample.decision == ("keep_web_and_synthetic" if synthetic else "keep_web")
        assert sample.captions[0] == sample.original_caption
        assert len(synthetic) <= 2 and sample.captions[1:] == synthetic
        assert sample.text_embeddings.shape == (1 + len(synthetic), 32)
        assert len(sample.scores["synthetic_itm"]) == len(synthetic) and 0.0 <= sample.scores["web_itm"] <= 1.0
        assert set(sample.label_names) >= {w for w in ("circle", "square", "triangle", "star", "diamond")
                                           if w in sample.original_caption}
    assert sum(len(sample.captions) - 1 for sample in samples) == stats["synthetic_captions_kept"] > 0

    # Threshold above 1 passes nothing: every sample is dropped, and still accounted for.
    settings.itm_threshold = 1.01
    stats = process_shard(str(raw), str(tmp_path / "features_strict"), settings)
    assert (stats["written"], stats["dropped_by_filter"]) == (0, 6)
    assert json.loads((tmp_path / "features_strict" / "00000_stats.json").read_text())["decisions"] == {"drop": 6}
