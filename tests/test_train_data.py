"""Feature-shard loader: every sample once per epoch over ranks x workers (at real shard and slot
counts too), the plan's description and differences, and exact mid-epoch resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vlpdist.data.feature_shards import (
    ShardPlan,
    build_shard_plan,
    build_train_loader,
    iterate_heldout,
    list_feature_shards,
    plan_differences,
    shard_sample_counts,
    split_heldout,
)
from vlpdist.data.synthetic import write_synthetic_feature_shards
from vlpdist.errors import UserError

# Uneven shard sizes, as after filtering: 9 shards of 5..29 samples (149 in all).
SIZES = [5, 29, 12, 20, 7, 16, 25, 9, 26]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    write_synthetic_feature_shards(folder, num_shards=len(SIZES), samples_per_shard=SIZES, dim=8, seed=3)
    return list_feature_shards(folder)


def _take(loader, count):
    return list(itertools.islice(iter(loader), count))


def _epoch_pieces(plan: ShardPlan, epoch: int) -> list[tuple[int, int, int]]:
    """(shard, first, end) of every piece any slot reads in `epoch`, from the plan alone, sorted."""
    return sorted(piece for slot in range(plan.num_slots) for piece in plan.slot_pieces(epoch, slot))


@pytest.mark.parametrize("num_shards,world_size,num_workers,micro_batch,max_left_fraction", [
    (328, 64, 2, 32, 0.011),     # the CC3M recipe: 128 rank x worker slots (dealing whole shards used 78 %)
    (100, 32, 2, 16, 0.011),     # 100 shards over 64 slots (dealing whole shards used 64 %)
    (10, 16, 4, 8, 0.05),        # fewer shards than slots: shards are split between slots
    (10_000, 128, 1, 64, 0.001),
])
def test_plan_at_real_counts_reads_every_sample_once_but_less_than_a_micro_batch_per_slot(
    num_shards, world_size, num_workers, micro_batch, max_left_fraction
):
    # Uneven counts as CapFilt leaves them: 40 % to 100 % of 1,000 samples per shard.
    counts = np.random.default_rng(num_shards).integers(400, 1001, num_shards).tolist()
    plan = ShardPlan([f"{i:05d}.tar" for i in range(num_shards)], counts, world_size, num_workers, micro_batch, seed=7)
    plan.check()
    slots = world_size * num_workers
    for epoch in (0, 1):
        pieces = _epoch_pieces(plan, epoch)
        assert all(0 <= first < end <= counts[index] for index, first, end in pieces)
        # No sample twice: pieces of one shard do not overlap.
        assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(pieces, pieces[1:]))
        read = sum(end - first for _, first, end in pieces)
        assert read == slots * plan.batches_per_slot * micro_batch
        left_out = sum(counts) - read
        assert left_out == plan.left_out_per_epoch < slots * micro_batch
    # What that bound means at these sizes (slots x micro-batch / samples, worked out per case).
    assert plan.left_out_per_epoch / sum(counts) < max_left_fraction
    # Another epoch, another order: the left-out tail moves.
    assert _epoch_pieces(plan, 0) != _epoch_pieces(plan, 1)


def test_counts_come_from_the_processing_stats_and_tars_without_stats_are_counted(shards, tmp_path):
    counts, counted = shard_sample_counts(shards)
    assert counts == SIZES and counted == 0
    # A shard made by another tool (no stats file) is counted from its tar.
    for path in shards[:2]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert shard_sample_counts(sorted(tmp_path.glob("*.tar"))) == (SIZES[:2], 2)


@pytest.mark.parametrize("num_workers", [2, 0])
def test_one_epoch_over_two_ranks_reads_every_key_once_but_the_bounded_remainder(shards, num_workers):
    plan = build_shard_plan(shards, world_size=2, num_workers=num_workers, micro_batch_size=4, seed=0)
    per_rank = plan.batches_per_rank
    seen = []
    for rank in range(2):
        batches = _take(build_train_loader(plan, rank, 0), per_rank + 1)
        assert [batch["position"] for batch in batches] == list(range(per_rank + 1))
        assert all(batch["epoch"] == 0 for batch in batches[:per_rank]) and batches[per_rank]["epoch"] == 1
        assert all(batch["clip"].shape == (4, 8) for batch in batches)
        seen += [key for batch in batches[:per_rank] for key in batch["keys"]]
    all_keys = {f"{shard:05d}{index:04d}" for shard, size in enumerate(SIZES) for index in range(size)}
    assert len(seen) == len(set(seen)) and set(seen) <= all_keys
    # 149 samples over 2 x max(W, 1) slots of whole micro-batches of 4: fewer than one micro-batch per slot is left out.
    assert len(all_keys) - len(seen) == plan.left_out_per_epoch < plan.num_slots * 4


def test_loader_tokenizes_in_its_workers(shards):
    def tokenize(captions):
        import torch

        lengths = [len(caption.split()) for caption in captions]
        ids = torch.zeros(len(captions), max(lengths), dtype=torch.long)
        return ids, (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()

    plan = build_shard_plan(shards, world_size=1, num_workers=2, micro_batch_size=4, seed=0)
    batch = _take(build_train_loader(plan, 0, 0, tokenize=tokenize), 1)[0]
    assert batch["attention_mask"].sum(1).tolist() == [len(caption.split()) for caption in batch["caption"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(shards, num_workers):
    plan = build_shard_plan(shards, world_size=2, num_workers=num_workers, micro_batch_size=3, seed=1)
    per_rank_epoch = plan.batches_per_rank
    total = 2 * per_rank_epoch + 3  # into the third epoch
    straight = _take(build_train_loader(plan, 1, 0), total)
    resume_at = per_rank_epoch + 3  # mid second epoch, not a multiple of the worker count
    resumed = _take(build_train_loader(plan, 1, resume_at), total - resume_at)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[resume_at:]]
    assert [b["caption"] for b in resumed] == [b["caption"] for b in straight[resume_at:]]
    np.testing.assert_array_equal(resumed[0]["clip"].numpy(), straight[resume_at]["clip"].numpy())
    assert [b["position"] for b in resumed] == list(range(resume_at, total))
    # A new epoch reshuffles: the second epoch's order differs from the first.
    assert straight[0]["keys"] != straight[per_rank_epoch]["keys"]


def test_plan_description_names_what_changed(shards):
    train, heldout = split_heldout(shards, 2)
    plan = build_shard_plan(train, 2, 1, 4, seed=0, heldout=heldout)
    same = build_shard_plan(train, 2, 1, 4, seed=0, heldout=heldout)
    assert plan.fingerprint() == same.fingerprint() and plan_differences(plan.describe(), same.describe()) == []
    assert [name for name, _ in plan.describe()["shards"]] == [path.name for path in train]
    other = build_shard_plan(train[:-1], 2, 2, 3, seed=0, heldout=shards[-3:])
    changes = plan_differences(plan.describe(), other.describe())
    assert changes[:2] == ["num_workers 1 -> 2", "micro_batch_size 4 -> 3"]
    assert changes[2] == f"training shards: 1 removed (e.g. {train[-1].name})"
    assert changes[3].startswith("held-out shards")
    assert plan.fingerprint() != other.fingerprint()


def test_replanned_epochs_are_numbered_and_seeded_from_first_epoch(shards):
    plan = build_shard_plan(shards, 1, 0, 4, seed=0)
    later = build_shard_plan(shards, 1, 0, 4, seed=0)
    later.first_epoch = 3
    assert later.epoch_of_position(0) == (3, 0) and plan.epoch_of_position(3 * plan.batches_per_rank + 1) == (3, 1)
    straight = _take(build_train_loader(plan, 0, 3 * plan.batches_per_rank), 2)
    replanned = _take(build_train_loader(later, 0, 0), 2)
    assert [b["keys"] for b in replanned] == [b["keys"] for b in straight] and replanned[0]["epoch"] == 3


def test_heldout_split_iteration_and_sharing_over_ranks(shards):
    train, heldout = split_heldout(shards, 2)
    assert len(train) == 7 and heldout == shards[-2:]
    batches = list(iterate_heldout(heldout, batch_size=10, max_samples=22))
    assert [len(b["keys"]) for b in batches] == [10, 10, 2]
    shares = [[key for b in iterate_heldout(heldout, 4, 22, rank, 3) for key in b["keys"]] for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(key for b in batches for key in b["keys"])
    assert [len(share) for share in shares] == [8, 7, 7]
    assert split_heldout(shards, 0) == (shards, [])
    with pytest.raises(UserError, match="heldout_shards"):
        split_heldout(shards, 9)


def test_too_few_samples_for_the_slots_is_a_user_error(shards):
    with pytest.raises(UserError, match="micro_batch_size"):
        build_shard_plan(shards[:1], world_size=2, num_workers=2, micro_batch_size=2, seed=0)


def test_a_shard_shorter_than_its_stats_is_named(tmp_path):
    write_synthetic_feature_shards(tmp_path, num_shards=2, samples_per_shard=8, dim=4)
    (tmp_path / "00001_stats.json").write_text('{"shard": "00001", "written": 12}')  # the tar holds 8
    with pytest.raises(UserError, match=r"00001.tar holds 8 samples but 00001_stats.json counts 12"):
        build_shard_plan(list_feature_shards(tmp_path), world_size=1, num_workers=0, micro_batch_size=20, seed=0)
    # A shard that changes after the plan was made is named when a slot reads past its end.
    plan = build_shard_plan(list_feature_shards(tmp_path), world_size=1, num_workers=0, micro_batch_size=20, seed=0,
                            counts=[8, 12])
    with pytest.raises(UserError, match=r"00001.tar holds 8 samples, but its stats count 12"):
        _take(build_train_loader(plan, 0, 0), 1)
