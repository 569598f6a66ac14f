"""A processing task starts its decoding workers once: every shard it is given after the first is decoded
by the same worker processes, with the outputs of a shard processed alone; a pass left unfinished stops
them, and the next shard starts fresh ones and is still right."""

from __future__ import annotations

import os

import pandas as pd
import psutil
from process_fixtures import TINY_CLIP, write_raw_shards

from data_ingest.process.shard import ShardProcessor, index_raw_shard, process_shard
from vlpdist.config import ProcessConfig
from vlpdist.data.feature_format import iterate_feature_shards


def _children() -> set[int]:
    return {child.pid for child in psutil.Process(os.getpid()).children() if child.status() != psutil.STATUS_ZOMBIE}


def _outputs(features, shard_name: str) -> tuple[list, list]:
    """(key, image embedding bytes, captions) of each written sample, and the decision rows (the tar's headers carry mtimes)."""
    written = [(s.key, s.image_embedding.tobytes(), s.captions) for s in iterate_feature_shards(str(features / f"{shard_name}.tar"))]
    decisions = pd.read_parquet(features / f"{shard_name}_decisions.parquet").to_dict("records")
    return written, decisions


def test_a_task_reuses_its_loader_workers_across_shards(tmp_path, tiny_clip):
    shards = write_raw_shards(tmp_path, num_samples=24, per_shard=8)
    settings = ProcessConfig(clip_model=TINY_CLIP, clip_pretrained=str(tiny_clip), filter="none", caption_policy="web",
                             captioner="", vocab="demo_shapes", batch_size=4, loader_workers=2)
    processor = ShardProcessor(settings)
    before = _children()
    workers = []
    for raw in shards[:2]:
        processor.process(str(raw), str(tmp_path / "features"))
        workers.append(_children() - before)
    assert len(workers[0]) == 2 and workers[1] == workers[0], workers  # the same two processes, still alive

    # A pass abandoned mid-shard stops its workers (they may be waiting on a chunk nobody reads).
    first = workers[0]
    unfinished = processor.chunk_loader.chunks(shards[2], index_raw_shard(shards[2]).samples, 4)
    next(unfinished)
    unfinished.close()
    psutil.wait_procs([psutil.Process(pid) for pid in first if psutil.pid_exists(pid)], timeout=60)
    assert not (_children() & first)

    processor.process(str(shards[2]), str(tmp_path / "features"))
    assert len(_children() - before) == 2 and not ((_children() - before) & first)  # fresh ones

    # Every shard's outputs equal those of the shard processed alone, with workers of its own.
    for raw in shards:
        process_shard(str(raw), str(tmp_path / "alone"), settings)
        assert _outputs(tmp_path / "features", raw.stem) == _outputs(tmp_path / "alone", raw.stem), raw.name
    processor.chunk_loader.close()
