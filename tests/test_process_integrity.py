"""Processing never loses a sample silently: a raw tar cut or corrupted anywhere (header boundary,
inside a header, mid-data) leaves every downloaded sample in exactly one decisions row, and only
admitted image formats of bounded size are decoded (anything else is a failed row with its reason)."""

from __future__ import annotations

import io
import tarfile
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from process_fixtures import TINY_CLIP, replace_tar_member, write_raw_shards

from data_ingest.process.shard import index_raw_shard, process_shard
from vlpdist.config import ProcessConfig

SAMPLES = 6
CUT_SAMPLE = 2  # the cuts fall in or just before this sample's members (sample 2 of 0..5)


def _cut_or_corrupt(tar_path, how: str) -> int:
    """Damage the raw tar around sample CUT_SAMPLE; returns how many samples (in key order) stay whole."""
    with tarfile.open(tar_path) as archive:
        members = {member.name: member for member in archive.getmembers()}
    key = f"00000{CUT_SAMPLE:04d}"
    first, second = members[f"{key}.jpg"], members[f"{key}.json"]  # webdataset writes jpg, json, txt
    data = tar_path.read_bytes()
    header = second.offset_data - tarfile.BLOCKSIZE  # the member's own header (after its pax header)
    damaged = {
        # The samples before are whole but the last one before the cut cannot be known to be.
        "at_header_between_samples": data[: first.offset],
        "at_header_inside_a_sample": data[: second.offset],
        "inside_a_header": data[: second.offset + 100],  # webdataset's members start with a pax header
        "inside_the_header_after_a_pax_header": data[: header + 100],
        "mid_data": data[: second.offset_data + second.size // 2],
        # A flipped byte in a member's first header: its checksum fails, tarfile reads it as the end.
        "corrupt_header": data[: second.offset] + b"X" + data[second.offset + 1:],
        # What a crash can leave: the file at its length, its tail zeros (reads as a normal end).
        "zeroed_tail": data[: second.offset] + bytes(len(data) - second.offset),
    }[how]
    tar_path.write_bytes(damaged)
    return CUT_SAMPLE - 1 if how == "at_header_between_samples" else CUT_SAMPLE


def _downloaded_keys(tar_path) -> list[str]:
    parquet = pd.read_parquet(tar_path.with_suffix(".parquet"))
    return parquet.loc[parquet["status"] == "success", "key"].tolist()


DAMAGES = ["at_header_between_samples", "at_header_inside_a_sample", "inside_a_header",
           "inside_the_header_after_a_pax_header", "mid_data", "corrupt_header", "zeroed_tail"]


@pytest.mark.parametrize("how", DAMAGES)
def test_every_downloaded_sample_is_whole_or_lost_with_a_row_wherever_the_tar_is_cut(tmp_path, how):
    (tar_path,) = write_raw_shards(tmp_path, num_samples=SAMPLES, per_shard=SAMPLES)
    keys = _downloaded_keys(tar_path)
    whole = _cut_or_corrupt(tar_path, how)
    index = index_raw_shard(tar_path)
    assert index.tar_error
    assert [sample.key for sample in index.samples] == keys[:whole]
    assert all(sorted(sample.members) == ["jpg", "json", "txt"] for sample in index.samples)
    assert index.lost == [(key, f"http://127.0.0.1:1/img/{i:06d}.jpg", "truncated_tar")
                          for i, key in enumerate(keys) if i >= whole]


def test_a_whole_tar_keeps_every_sample(tmp_path):
    (tar_path,) = write_raw_shards(tmp_path, num_samples=SAMPLES, per_shard=SAMPLES)
    index = index_raw_shard(tar_path)
    assert index.tar_error is None and index.lost == []
    assert [sample.key for sample in index.samples] == _downloaded_keys(tar_path)


def _settings(tiny_clip, **more) -> ProcessConfig:
    return ProcessConfig(clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip), vocab="demo_shapes",
                         clip_threshold=-1.0, batch_size=4, **more)


def _assert_each_downloaded_sample_has_one_row(tar_path, features, stats):
    decisions = pd.read_parquet(features / f"{tar_path.stem}_decisions.parquet")
    assert sorted(decisions["key"]) == sorted(_downloaded_keys(tar_path))  # each exactly once
    assert stats["raw_samples"] == len(decisions) == (
        stats["written"] + stats["dropped_by_filter"] + sum(stats["failed"].values()))
    return decisions


@pytest.mark.parametrize("how", ["at_header_inside_a_sample", "inside_a_header", "mid_data"])
def test_a_cut_shard_accounts_for_every_downloaded_sample_in_its_rows_and_stats(tmp_path, tiny_clip, how):
    (tar_path,) = write_raw_shards(tmp_path, num_samples=SAMPLES, per_shard=SAMPLES)
    whole = _cut_or_corrupt(tar_path, how)
    stats = process_shard(str(tar_path), str(tmp_path / "features"), _settings(tiny_clip))
    decisions = _assert_each_downloaded_sample_has_one_row(tar_path, tmp_path / "features", stats)
    assert stats["tar_error"] and stats["failed"] == {"truncated_tar": SAMPLES - whole}
    assert stats["written"] == whole
    assert sorted(decisions.loc[decisions["reason"] == "truncated_tar", "key"]) == _downloaded_keys(tar_path)[whole:]


def _encoded(size: int, format: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format)
    return buffer.getvalue()


def test_only_admitted_formats_of_bounded_size_are_decoded(tmp_path, tiny_clip):
    """Max 2,000 pixels: the shard's own 32 px images (1,024) pass; 50 px (2,500: PIL would only
    warn) and 64 px (4,096: PIL would raise) are failed rows, and no DecompressionBombWarning escapes.
    GIF, BMP, TIFF, PNG and WebP decode; PPM and ICO (formats PIL knows, but not web images') do not."""
    (tar_path,) = write_raw_shards(tmp_path, num_samples=9, per_shard=9)
    images = {0: _encoded(32, "GIF"), 1: _encoded(32, "BMP"), 2: _encoded(32, "TIFF"), 3: _encoded(32, "PNG"),
              4: _encoded(32, "WEBP"), 5: _encoded(32, "PPM"), 6: _encoded(32, "ICO"), 7: _encoded(50, "PNG"),
              8: _encoded(64, "JPEG")}
    for index, data in images.items():
        replace_tar_member(tar_path, f"00000{index:04d}.jpg", data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = process_shard(str(tar_path), str(tmp_path / "features"), _settings(tiny_clip, max_image_pixels=2000))
    assert not [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)]
    decisions = _assert_each_downloaded_sample_has_one_row(tar_path, tmp_path / "features", stats)
    reasons = dict(zip(decisions["key"].str[-1].astype(int), decisions["reason"]))
    assert reasons == {0: "", 1: "", 2: "", 3: "", 4: "", 5: "decode_error", 6: "decode_error",
                       7: "too_many_pixels", 8: "too_many_pixels"}
    assert stats["written"] == 5 and stats["failed"] == {"decode_error": 2, "too_many_pixels": 2}
    assert Image.MAX_IMAGE_PIXELS != 2000  # the stage's bound does not stay behind in the process
