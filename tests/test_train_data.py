"""Feature-shard loader: disjoint split over ranks x workers, and exact mid-epoch resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vlpdist.data.feature_shards import (
    build_shard_plan,
    build_train_loader,
    iterate_heldout,
    list_feature_shards,
    split_heldout,
)
from vlpdist.data.synthetic import write_synthetic_feature_shards
from vlpdist.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    # Uneven shard sizes would be the norm after filtering: drop a few samples by writing 9 shards of 13.
    write_synthetic_feature_shards(folder, num_shards=9, samples_per_shard=13, dim=8, seed=3)
    return list_feature_shards(folder)


def _take(loader, count):
    return list(itertools.islice(iter(loader), count))


def test_one_epoch_over_ranks_and_workers_reads_no_sample_twice(shards):
    plan = build_shard_plan(shards, world_size=2, num_workers=2, micro_batch_size=4, seed=0)
    per_rank = plan.batches_per_slot(0) * 2
    seen = []
    for rank in range(2):
        batches = _take(build_train_loader(plan, rank, 0), per_rank)
        assert [batch["position"] for batch in batches] == list(range(per_rank))
        assert all(batch["epoch"] == 0 for batch in batches)
        assert all(batch["clip"].shape == (4, 8) for batch in batches)
        seen += [key for batch in batches for key in batch["keys"]]
    assert len(seen) == len(set(seen)) == 4 * per_rank * 2
    # Every slot is cut to the smallest slot, so at most a slot's worth of samples is dropped per epoch.
    assert len(seen) > 9 * 13 - 4 * (13 * 3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(shards, num_workers):
    plan = build_shard_plan(shards, world_size=2, num_workers=num_workers, micro_batch_size=3, seed=1)
    per_rank_epoch = plan.batches_per_slot(0) * max(num_workers, 1)
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


def test_heldout_split_and_iteration(shards):
    train, heldout = split_heldout(shards, 2)
    assert len(train) == 7 and heldout == shards[-2:]
    batches = list(iterate_heldout(heldout, batch_size=10, max_samples=22))
    assert [len(b["keys"]) for b in batches] == [10, 10, 2]
    with pytest.raises(UserError, match="heldout_shards"):
        split_heldout(shards, 9)


def test_too_few_shards_for_the_slots_is_a_user_error(shards):
    with pytest.raises(UserError, match="num_workers"):
        build_shard_plan(shards[:3], world_size=2, num_workers=2, micro_batch_size=2, seed=0)
