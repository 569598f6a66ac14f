"""Question rows through processing (issue 18 item 1): a raw shard as img2dataset writes it with the
QA extra columns -> feature samples that carry them; a question-only row is kept, not filtered as an
empty caption; bad answers fail their row; every row ends in exactly one state."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from process_fixtures import TINY_CLIP

from vlpdist.config import load_config
from vlpdist.data.feature_format import iterate_feature_shards

pytestmark = pytest.mark.slow

ROWS = [  # (caption, json extras)
    ("a red circle", {}),
    ("", {"question": "what colour is the circle?", "answers": ["red"] * 8 + ["pink", "red"], "answer_type": "other"}),
    ("a blue square", {"question": "is there a square?", "answers": '["yes", "yes", "no"]', "answer_type": "yes/no"}),
    ("", {"question": "how many stars?", "answers": "two stars"}),  # csv-style answers that are no JSON list
]


def _write_raw_shard(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    raw = root / "raw"
    raw.mkdir(parents=True)
    tar_path = raw / "00000.tar"
    rows = {"key": [], "status": [], "url": [], "caption": []}
    with wds.TarWriter(str(tar_path)) as sink:
        for index, (caption, extras) in enumerate(ROWS):
            key, url = f"0000{index:05d}", f"http://127.0.0.1:1/{index}.png"
            buffer = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 40 * index, dtype=np.uint8)).save(buffer, format="PNG")
            sink.write({"__key__": key, "png": buffer.getvalue(), "txt": caption.encode(),
                        "json": json.dumps({"key": key, "url": url, "caption": caption, **extras}).encode()})
            for column, value in zip(rows, (key, "success", url, caption)):
                rows[column].append(value)
    pq.write_table(pa.table(rows), tar_path.with_suffix(".parquet"))
    return tar_path


@pytest.mark.parametrize("threshold", [-1.0, 2.0])  # the filter keeps every caption / drops every caption
def test_question_rows_become_question_samples(tmp_path, tiny_clip, threshold):
    from data_ingest.process.shard import QUESTION_ONLY_DECISION, ShardProcessor

    raw_tar = _write_raw_shard(tmp_path)
    config = load_config(None, [f"root={tmp_path}", f"process.clip_model={TINY_CLIP}", f"process.clip_pretrained={tiny_clip}",
                                "process.vocab=demo_shapes", "process.batch_size=8", "process.cpus_per_task=1",
                                f"process.clip_threshold={threshold}"])
    stats = ShardProcessor(config.process).process(str(raw_tar), str(tmp_path / "features"))
    assert stats["raw_samples"] == len(ROWS) == stats["written"] + stats["dropped_by_filter"] + sum(stats["failed"].values())
    assert stats["failed"] == {"bad_answers": 1} and stats["questions_written"] == 2
    samples = {sample.key: sample for sample in iterate_feature_shards(str(tmp_path / "features" / "00000.tar"))}
    question_only = samples["000000001"]
    assert question_only.captions == [] and question_only.decision == QUESTION_ONLY_DECISION
    assert question_only.qa == {"question": "what colour is the circle?", "answers": ["red"] * 8 + ["pink", "red"], "answer_type": "other"}
    assert question_only.text_embeddings.shape == (1, 32)
    assert "circle" in question_only.label_names  # labels from the question and its answers
    mixed = samples["000000002"]
    assert mixed.qa["answers"] == ["yes", "yes", "no"]  # a JSON list in a string (csv/tsv) became a list
    if threshold < 0:
        assert mixed.captions == ["a blue square"] and stats["dropped_by_filter"] == 0
        assert set(samples) == {"000000000", "000000001", "000000002"}
    else:  # its caption dropped by the filter: kept for its question, as question-only
        assert mixed.captions == [] and mixed.decision == QUESTION_ONLY_DECISION and stats["dropped_by_filter"] == 1
        assert "000000000" not in samples
