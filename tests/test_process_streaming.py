"""The processing task streams its shard: bounded memory, and the outputs of the whole-shard computation."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from common_fixtures import REPO
from process_fixtures import TINY_CLIP, replace_tar_member, save_tiny_blip, write_raw_shards, write_repeated_raw_shard
from process_ray_fixtures import ray_pythonpath

from vlpdist.data.feature_format import iterate_feature_shards
from data_ingest.process.shard import (
    DecodedSample,
    ShardProcessor,
    _image_transforms,
    _process_batch,
    _sample_meta,
    process_shard,
    read_inputs,
)
from vlpdist.config import ProcessConfig
from vlpdist.errors import UserError

PEAK_RSS_SCRIPT = """
import json, resource, sys
import torch
from data_ingest.process.shard import process_shard
from vlpdist.config import ProcessConfig
raw, out, settings = sys.argv[1:4]
torch.set_num_threads(1)  # the machine is shared: one thread keeps the run short and steady
process_shard(raw, out, ProcessConfig(**json.loads(settings)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def _peak_rss_mib(raw, out, settings: dict) -> float:
    """Peak resident memory of a fresh process that runs one shard task (the task's own process: no loader workers)."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(raw), str(out), json.dumps(settings)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=ray_pythonpath(), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_task_memory_does_not_grow_with_the_shard(tmp_path, tiny_clip):
    """A 10k-sample shard takes the memory of a 1k-sample one, within 64 MiB.

    The 9,000 extra 96-px images are 9000 * 96 * 96 * 3 B = 249 MB decoded (and 180 MB as JPEG
    bytes): a task that decoded its whole shard before the first batch (as this stage once did:
    +426 MiB measured here) fails this by far. What may grow is a decisions row and an index entry
    per sample, about 2 KB.
    """
    settings = {"clip_model": TINY_CLIP, "clip_pretrained": str(tiny_clip), "vocab": "demo_shapes",
                "clip_threshold": -1.0, "batch_size": 64, "cpus_per_task": 1.0}
    peaks = {}
    for samples in (1000, 10000):
        raw = write_repeated_raw_shard(tmp_path / f"in_{samples}", samples, image_size=96)
        peaks[samples] = _peak_rss_mib(raw, tmp_path / f"out_{samples}", settings)
        stats = json.loads((tmp_path / f"out_{samples}" / "00000_stats.json").read_text())
        assert stats["raw_samples"] == stats["written"] == samples
        raw.unlink()  # 10k noise JPEGs are ~200 MB on disk
    assert peaks[10000] - peaks[1000] < 64, peaks


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def _whole_shard_reference(raw, settings: ProcessConfig, models: dict):
    """What the stage computed before it streamed: every sample of the shard decoded first, then
    each batch of `batch_size` usable samples preprocessed together and run through the models.
    Returns (failures as (key, url, reason), one result per usable sample)."""
    good, failures, _ = read_inputs(raw, captioner_on=bool(settings.captioner), max_pixels=settings.max_image_pixels)
    transforms = _image_transforms(models)
    results = []
    for start in range(0, len(good), settings.batch_size):
        part = good[start : start + settings.batch_size]
        pixels = {name: transform([image for _, image, _ in part]) for name, transform in transforms.items()}
        batch = [DecodedSample(sample.key, _sample_meta(sample).get("url", ""), caption,
                               {name: pixels_B3HW[i] for name, pixels_B3HW in pixels.items()})
                 for i, (sample, _, caption) in enumerate(part)]
        results += _process_batch(batch, settings, models, "cpu")
    return failures, results


@pytest.mark.slow
@pytest.mark.parametrize("cpus_per_task", [1.0, 3.0], ids=["in_task", "2_loader_workers"])
def test_streamed_outputs_equal_the_whole_shard_computation(tmp_path, tiny_clip, tiny_blip, cpus_per_task):
    """Captioner + ITM filter on shards with a corrupt image, an empty web caption and a cut tar,
    chunks of 4 raw samples re-batched into batches of 4 usable ones: the feature shards and
    decisions are, value for value, those of the whole-shard computation (same order, same float
    bits, same sampled captions). Threshold 0 keeps every candidate, so every one is written and compared."""
    shards = write_raw_shards(tmp_path, num_samples=30, per_shard=10)
    replace_tar_member(shards[0], "000000005.txt", b"")
    replace_tar_member(shards[1], "000010003.jpg", b"\xff\xd8 not really a jpeg")
    shards[2].write_bytes(shards[2].read_bytes()[: shards[2].stat().st_size * 45 // 100])
    settings = ProcessConfig(
        clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip), captioner=str(tiny_blip / "captioner"),
        num_synthetic_captions=2, max_caption_tokens=6, filter="itm", itm_model=str(tiny_blip / "itm"),
        itm_threshold=0.0, caption_policy="web_and_synthetic", vocab="demo_shapes", batch_size=4,
        cpus_per_task=cpus_per_task,
    )
    processor = ShardProcessor(settings)  # what each actor of the stage holds: its models, loaded once
    features = tmp_path / "features"
    proposed, written_samples = 0, 0
    for raw in shards:
        torch.manual_seed(0)  # the captioner samples: both computations start from the same state
        stats = processor.process(str(raw), str(features))
        torch.manual_seed(0)
        failures, results = _whole_shard_reference(raw, settings, processor.models)

        decisions = pd.read_parquet(features / f"{raw.stem}_decisions.parquet")
        expected_rows = [(key, url, "failed", reason) for key, url, reason in failures] + [
            (r["sample"].key, r["sample"].url, "written" if r["choice"].kept else "dropped", "") for r in results]
        assert list(decisions[["key", "url", "status", "reason"]].itertuples(index=False, name=None)) == expected_rows
        assert decisions["decision"].tolist()[len(failures):] == [r["choice"].decision for r in results]
        assert stats["raw_samples"] == len(expected_rows)
        proposed += sum(len(r["scores"]["synthetic_captions"]) for r in results)

        kept = [r for r in results if r["choice"].kept]
        written = list(iterate_feature_shards(str(features / f"{raw.stem}.tar")))
        assert [sample.key for sample in written] == [r["sample"].key for r in kept]
        written_samples += len(written)
        for sample, result in zip(written, kept):
            assert sample.image_embedding.tobytes() == result["image_D"].astype("float16").tobytes()
            assert sample.text_embeddings.tobytes() == result["kept_text_CD"].astype("float16").tobytes()
            assert sample.captions == result["kept_captions"] and sample.scores == result["scores"]
            assert sample.labels == result["labels"]
    summary = [json.loads((features / f"{raw.stem}_stats.json").read_text()) for raw in shards]
    assert summary[0]["failed"] == {} and summary[1]["failed"] == {"decode_error": 1}
    assert summary[2]["tar_error"] and summary[2]["failed"]["truncated_tar"] >= 3
    assert proposed > 0 and written_samples > 0  # the captioner's captions and the written shards were compared


def test_compressed_raw_shard_is_a_user_error(tmp_path, tiny_clip):
    (raw,) = write_raw_shards(tmp_path, num_samples=2, per_shard=2)
    raw.write_bytes(gzip.compress(raw.read_bytes()))
    settings = ProcessConfig(clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip), vocab="demo_shapes")
    with pytest.raises(UserError, match="gz-compressed"):
        process_shard(str(raw), str(tmp_path / "features"), settings)
