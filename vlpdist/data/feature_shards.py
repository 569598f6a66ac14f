"""Feature shards -> micro-batches, split across ranks and loader workers, resumable mid-epoch.

Every rank and every loader worker of it is one *slot* (`rank * num_workers + worker`). In each
epoch the training shards are put in a seeded order and dealt to the slots round-robin, so no
sample is read twice per epoch (webdataset's `split_by_node`/`split_by_worker` deal the same
way; the deal is done here because exact resume needs it to be a pure function of the epoch).
Each slot streams its shards with webdataset through a seeded shuffle buffer and cuts
micro-batches; every slot is cut to the same number of batches per epoch (the smallest), so all
ranks take the same number of steps and stay in lockstep, dropping at most a few samples.

A rank's DataLoader takes batches from its workers in turn, so the rank's n-th micro-batch is
batch n // W of worker n % W. The data position saved in checkpoints is that one number n
(micro-batches consumed by the rank): on resume, every worker replays its slot's stream from the
start of the epoch without decoding, and worker order is rotated so that the next batch comes
first. Samples are seeded by epoch, so the resumed run sees exactly what the straight run saw.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vlpdist.errors import UserError


def list_feature_shards(features_dir: str | Path) -> list[Path]:
    """The `NNNNN.tar` shards of a features folder, sorted by name."""
    folder = Path(features_dir)
    if not folder.is_dir():
        raise UserError(f"feature folder {folder} does not exist (run the processing stage first)")
    shards = sorted(path for path in folder.glob("*.tar") if path.stem.isdigit())
    if not shards:
        raise UserError(f"feature folder {folder} holds no NNNNN.tar shards")
    return shards


def split_heldout(shards: list[Path], heldout_shards: int) -> tuple[list[Path], list[Path]]:
    """(training shards, held-out shards): the last `heldout_shards` are held out."""
    if heldout_shards < 0 or heldout_shards >= len(shards):
        raise UserError(
            f"config key 'train.heldout_shards' is {heldout_shards}; the feature folder has {len(shards)} shards "
            "and at least one must be left for training"
        )
    cut = len(shards) - heldout_shards
    return shards[:cut], shards[cut:]


def count_shard_samples(shard: Path) -> int:
    """Samples in a webdataset tar: distinct keys (the member name up to its first dot)."""
    with tarfile.open(shard, "r:") as archive:
        keys = {Path(name).name.split(".", 1)[0] for name in archive.getnames()}
    return len(keys)


def _epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *more])


def deal_shards(num_shards: int, num_slots: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices of each slot in `epoch`: a seeded permutation dealt round-robin."""
    order = _epoch_rng(seed, epoch).permutation(num_shards)
    return [order[slot::num_slots].tolist() for slot in range(num_slots)]


@dataclass
class ShardPlan:
    """What every slot reads: the training shards and their sample counts, the slot layout, the seed."""

    shards: list[str]
    counts: list[int]
    world_size: int
    num_workers: int
    micro_batch_size: int
    seed: int
    shuffle_buffer: int = 1000

    @property
    def num_slots(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def batches_per_slot(self, epoch: int) -> int:
        """Micro-batches every slot yields in `epoch` (the smallest slot decides)."""
        slots = deal_shards(len(self.shards), self.num_slots, self.seed, epoch)
        return min(sum(self.counts[index] for index in slot) for slot in slots) // self.micro_batch_size

    def check(self) -> None:
        if len(self.shards) < self.num_slots:
            raise UserError(
                f"{len(self.shards)} training shards cannot feed {self.world_size} ranks x "
                f"{max(self.num_workers, 1)} loader workers (one shard per slot at least); lower train.num_workers"
            )
        if self.batches_per_slot(0) < 1:
            raise UserError(
                f"too few training samples for micro-batches of {self.micro_batch_size} on "
                f"{self.num_slots} rank x worker slots; lower train.micro_batch_size"
            )

    def locate(self, slot_batch: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a slot's `slot_batch`-th batch counted from the start."""
        epoch = 0
        while slot_batch >= (per_epoch := self.batches_per_slot(epoch)):
            slot_batch -= per_epoch
            epoch += 1
        return epoch, slot_batch


def build_shard_plan(shards: list[Path], world_size: int, num_workers: int, micro_batch_size: int, seed: int) -> ShardPlan:
    plan = ShardPlan(
        shards=[str(path) for path in shards],
        counts=[count_shard_samples(path) for path in shards],
        world_size=world_size,
        num_workers=num_workers,
        micro_batch_size=micro_batch_size,
        seed=seed,
    )
    plan.check()
    return plan


def _raw_samples(shards: list[str]) -> Iterator[dict[str, Any]]:
    """Undecoded samples (member bytes by extension) of the shards, in order, via webdataset."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    return iter(pipeline)


def _shuffled(samples: Iterator[dict[str, Any]], buffer_size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A seeded shuffle buffer: fill, then emit a random element and put the next sample in its place."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = int(rng.integers(len(buffer)))
        yield buffer[index]
        buffer[index] = sample
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def _decode(sample: dict[str, Any], epoch: int) -> dict[str, Any]:
    from data_ingest.process.feature_format import decode_feature_sample

    feature = decode_feature_sample(sample)
    # One of the kept captions per sample and epoch, chosen from the key so that it does not
    # depend on the order samples are read in.
    choice = zlib.crc32(f"{epoch}:{feature.key}".encode()) % len(feature.captions)
    return {
        "key": feature.key,
        "clip": feature.image_embedding,
        "caption": feature.captions[choice],
        "captions": feature.captions,
        "labels": feature.labels,
    }


def collate_features(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> a batch: `clip` (B, D) float32 and per-sample lists."""
    return {
        "clip": torch.from_numpy(np.stack([sample["clip"] for sample in samples]).astype(np.float32)),
        "caption": [sample["caption"] for sample in samples],
        "captions": [sample["captions"] for sample in samples],
        "keys": [sample["key"] for sample in samples],
        "labels": [sample["labels"] for sample in samples],
    }


def slot_batches(plan: ShardPlan, slot: int, start_batch: int) -> Iterator[dict[str, Any]]:
    """Slot `slot`'s micro-batches forever (epoch after epoch), from its `start_batch`-th on."""
    epoch, skip = plan.locate(start_batch)
    while True:
        per_epoch = plan.batches_per_slot(epoch)
        shard_ids = deal_shards(len(plan.shards), plan.num_slots, plan.seed, epoch)[slot]
        stream = _shuffled(
            _raw_samples([plan.shards[index] for index in shard_ids]),
            plan.shuffle_buffer,
            _epoch_rng(plan.seed, epoch, slot),
        )
        for batch_index in range(per_epoch):
            raw = [next(stream) for _ in range(plan.micro_batch_size)]
            if batch_index < skip:  # replaying up to the resume point: no decoding
                continue
            batch = collate_features([_decode(sample, epoch) for sample in raw])
            batch["epoch"] = epoch
            yield batch
        skip = 0
        epoch += 1


class FeatureBatchStream(torch.utils.data.IterableDataset):
    """One rank's endless stream of micro-batches; use with `DataLoader(batch_size=None)`.

    `start_position` is the number of this rank's micro-batches already consumed (the saved data
    position). Each yielded batch carries `position`, its index in the rank's sequence.
    """

    def __init__(self, plan: ShardPlan, rank: int, start_position: int = 0):
        super().__init__()
        self.plan = plan
        self.rank = rank
        self.start_position = start_position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        workers = max(self.plan.num_workers, 1)
        # Rotate so that DataLoader worker 0 (asked first) holds the rank's next batch.
        worker = (loader_worker + self.start_position) % workers
        first = self.start_position // workers + (1 if worker < self.start_position % workers else 0)
        slot = self.rank * workers + worker
        for offset, batch in enumerate(slot_batches(self.plan, slot, first)):
            batch["position"] = (first + offset) * workers + worker
            yield batch


def build_train_loader(plan: ShardPlan, rank: int, start_position: int) -> torch.utils.data.DataLoader:
    """An endless DataLoader over this rank's micro-batches, starting after `start_position`."""
    return torch.utils.data.DataLoader(
        FeatureBatchStream(plan, rank, start_position),
        batch_size=None,
        num_workers=plan.num_workers,
        persistent_workers=plan.num_workers > 0,
        # Its own generator: starting workers must not draw from the global torch RNG, which
        # training restores from the checkpoint (MoE token selection draws from it).
        generator=torch.Generator().manual_seed(plan.seed),
    )


def iterate_heldout(shards: list[Path], batch_size: int, max_samples: int) -> Iterator[dict[str, Any]]:
    """Held-out batches in file order (first caption as the target, all kept captions as references)."""
    samples: list[dict[str, Any]] = []
    seen = 0
    for raw in _raw_samples([str(path) for path in shards]):
        if seen >= max_samples:
            break
        sample = _decode(raw, epoch=0)
        sample["caption"] = sample["captions"][0]
        samples.append(sample)
        seen += 1
        if len(samples) == batch_size:
            yield collate_features(samples)
            samples = []
    if samples:
        yield collate_features(samples)
