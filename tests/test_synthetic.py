"""The demo generator is deterministic and records its ground truth."""

import io
import re

from PIL import Image

from data_ingest.sources.synthetic import BROKEN_KINDS, SHAPES, broken_paths, demo_url_rows, generate_demo_samples
from vlpdist.config import DemoDataConfig


def test_same_seed_same_bytes_and_captions():
    config = DemoDataConfig(num_samples=50, seed=7)
    first, second = generate_demo_samples(config), generate_demo_samples(config)
    assert [s.jpeg for s in first] == [s.jpeg for s in second]
    assert [s.caption for s in first] == [s.caption for s in second]


def test_other_seed_other_world():
    a = generate_demo_samples(DemoDataConfig(num_samples=50, seed=1))
    b = generate_demo_samples(DemoDataConfig(num_samples=50, seed=2))
    assert [s.jpeg for s in a] != [s.jpeg for s in b]


def test_ground_truth_is_recorded():
    config = DemoDataConfig(num_samples=200, seed=0, mismatch_fraction=0.25)
    samples = generate_demo_samples(config)
    mismatched = [s for s in samples if s.is_mismatched]
    assert len(mismatched) == 50
    for sample in samples:
        words = re.findall(r"[a-z]+", sample.true_caption)
        assert [w for w in words if w in SHAPES] == list(sample.object_words)
        assert 1 <= len(sample.object_words) <= 3
        if sample.is_mismatched:
            assert sample.caption != sample.true_caption
        else:
            assert sample.caption == sample.true_caption
        image = Image.open(io.BytesIO(sample.jpeg))
        assert image.size == (config.image_size, config.image_size)


def test_captions_vary_over_shapes_colours_and_counts():
    samples = generate_demo_samples(DemoDataConfig(num_samples=300, seed=0))
    assert {w for s in samples for w in s.object_words} == set(SHAPES)
    assert {len(s.object_words) for s in samples} == {1, 2, 3}
    assert len({s.true_caption for s in samples}) > 100


def test_url_rows_hold_every_broken_kind_with_its_expected_reason():
    config = DemoDataConfig(num_samples=20, broken_per_kind=2)
    rows = demo_url_rows(generate_demo_samples(config), config, "http://127.0.0.1:1")
    assert len(rows) == 20 + 2 * len(BROKEN_KINDS)
    expected = [r["expected"] for r in rows if r["expected"] != "success"]
    assert sorted(expected) == sorted(reason for reason in BROKEN_KINDS.values() for _ in range(2))
    assert len(broken_paths(config)) == 2 * len(BROKEN_KINDS)
    assert any(r["expected"] != "success" for r in rows[:-len(BROKEN_KINDS)])
