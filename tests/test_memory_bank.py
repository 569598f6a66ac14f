"""The memory bank: the FIFO over two real gloo ranks, one valid row per sample id, a bit-exact
checkpoint round trip through safetensors, the bank-size rule at real rank counts, and the device
its buffers stay on."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common_fixtures import free_port
from safetensors.torch import load_file, save_file

from vlpdist.errors import UserError
from vlpdist.losses.distributed import DataParallelContext
from vlpdist.losses.memory_bank import MemoryBank, check_bank_geometry

# A bank size that is not a multiple of the 2 x 3 rows per step, so the writes wrap mid-block.
BANK_SIZE, EMBED_DIM, NUM_LABELS, ROWS_PER_RANK, WORLD_SIZE, STEPS = 10, 4, 3, 3, 2, 5
FIELDS = ("visual", "text", "labels", "sample_ids", "entered_step", "valid")


def rows_for(step: int, rank: int, device="cpu") -> tuple[torch.Tensor, ...]:
    """One rank's rows at one step, the same wherever they are built: (b, D), (b, D), (b, V) multi-hot, (b,) ids."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    visual_bD = torch.randn(ROWS_PER_RANK, EMBED_DIM, generator=generator)
    text_bD = torch.randn(ROWS_PER_RANK, EMBED_DIM, generator=generator)
    labels_bV = (torch.rand(ROWS_PER_RANK, NUM_LABELS, generator=generator) < 0.5).float()
    sample_ids_b = 100 * step + 10 * rank + torch.arange(ROWS_PER_RANK)  # unique over every step and rank
    return tuple(t.to(device) for t in (visual_bD, text_bD, labels_bV, sample_ids_b))


def snapshot(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in views.items()}


def run_rank(rank: int, port: int, out_dir) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    ctx = DataParallelContext(rank, WORLD_SIZE, torch.device("cpu"))
    bank = MemoryBank(BANK_SIZE, EMBED_DIM, NUM_LABELS, "cpu")
    history = []
    for step in range(STEPS):
        bank.enqueue(*rows_for(step, rank), step=step, ctx=ctx)
        history.append({"view": snapshot(bank.view()), "ordered": snapshot(bank.ordered_view())})
    torch.save(history, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def expected_ordered_view(steps_done: int) -> dict[str, torch.Tensor]:
    """The last BANK_SIZE rows of everything enqueued (each step: rank 0's rows, then rank 1's), empty rows first."""
    enqueued = {name: [] for name in FIELDS}
    for step in range(steps_done):
        for rank in range(WORLD_SIZE):
            visual_bD, text_bD, labels_bV, sample_ids_b = rows_for(step, rank)
            enqueued["visual"].append(visual_bD)
            enqueued["text"].append(text_bD)
            enqueued["labels"].append(labels_bV)
            enqueued["sample_ids"].append(sample_ids_b)
            enqueued["entered_step"].append(torch.full((ROWS_PER_RANK,), step))
            enqueued["valid"].append(torch.ones(ROWS_PER_RANK, dtype=torch.bool))
    empty = MemoryBank(BANK_SIZE, EMBED_DIM, NUM_LABELS, "cpu").view()
    # Never-written rows are the oldest: the empty bank's rows stand in front of all enqueued ones.
    return {name: torch.cat([empty[name], *enqueued[name]])[-BANK_SIZE:] for name in FIELDS}


@pytest.mark.slow
def test_two_ranks_hold_the_same_bank_and_it_is_the_last_rows_enqueued(tmp_path):
    mp.spawn(run_rank, args=(free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    histories = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert STEPS * WORLD_SIZE * ROWS_PER_RANK > BANK_SIZE  # the bank wrapped around
    for step in range(STEPS):
        expected = expected_ordered_view(step + 1)
        for name in FIELDS:
            assert torch.equal(histories[0][step]["view"][name], histories[1][step]["view"][name]), (step, name)
            for rank in range(WORLD_SIZE):
                assert torch.equal(histories[rank][step]["ordered"][name], expected[name]), (step, rank, name)


def enqueue_ids(bank: MemoryBank, sample_ids: list[int], step: int) -> None:
    """Rows that say where they came from: visual row i of step s is (s, i)."""
    rows = len(sample_ids)
    visual_MD = torch.stack([torch.full((rows,), float(step)), torch.arange(rows, dtype=torch.float32)], dim=1)
    bank.enqueue_gathered(visual_MD, visual_MD.clone(), torch.zeros(rows, 1), torch.tensor(sample_ids), step)


def valid_id_counts(bank: MemoryBank) -> Counter:
    views = bank.view()
    return Counter(views["sample_ids"][views["valid"]].tolist())


def test_each_sample_id_is_valid_once_and_the_newest_copy_wins():
    bank = MemoryBank(8, 2, 1, "cpu")
    enqueue_ids(bank, [0, 1, 2, 3], step=0)
    enqueue_ids(bank, [2, 3, 4], step=1)  # 2 and 3 seen again
    assert valid_id_counts(bank) == Counter({0: 1, 1: 1, 2: 1, 3: 1, 4: 1})
    views = bank.view()
    for sample_id in (2, 3):
        assert views["entered_step"][views["valid"] & (views["sample_ids"] == sample_id)].tolist() == [1]

    enqueue_ids(bank, [5, 5, 6, 5], step=2)  # duplicates within one gather; wraps over ids 0, 1 and the stale 2
    assert valid_id_counts(bank) == Counter({2: 1, 3: 1, 4: 1, 5: 1, 6: 1})
    assert bank.fill == 5
    views = bank.view()
    newest_five = views["valid"] & (views["sample_ids"] == 5)
    assert views["visual"][newest_five].tolist() == [[2.0, 3.0]]  # the last of the three, position 3

    enqueue_ids(bank, [7, -1], step=3)  # -1 pads a short gather and never becomes valid
    assert valid_id_counts(bank) == Counter({3: 1, 4: 1, 5: 1, 6: 1, 7: 1})


def test_without_unique_ids_duplicates_stay_valid():
    bank = MemoryBank(8, 2, 1, "cpu", unique_ids=False)
    enqueue_ids(bank, [0, 1], step=0)
    enqueue_ids(bank, [1, 1], step=1)
    assert valid_id_counts(bank) == Counter({0: 1, 1: 3})


def filled_bank(size: int = 8) -> MemoryBank:
    bank = MemoryBank(size, EMBED_DIM, NUM_LABELS, "cpu")
    for step in range(4):  # 12 rows into 8 slots: wrapped, pointer mid-bank
        bank.enqueue(*rows_for(step, 0), step=step, ctx=DataParallelContext())
    return bank


def assert_same_bank(left: MemoryBank, right: MemoryBank) -> None:
    assert (left.write_pointer, left.enqueued_count) == (right.write_pointer, right.enqueued_count)
    for views in ("view", "ordered_view"):
        left_views, right_views = getattr(left, views)(), getattr(right, views)()
        for name in FIELDS:
            assert left_views[name].dtype == right_views[name].dtype
            assert torch.equal(left_views[name], right_views[name]), (views, name)


def test_checkpoint_round_trip_through_safetensors_is_bit_exact(tmp_path):
    original = filled_bank()
    assert original.write_pointer == 4
    path = tmp_path / "bank.safetensors"
    save_file(original.state_tensors(), str(path))  # refuses shared storage or non-contiguous tensors
    restored = MemoryBank(8, EMBED_DIM, NUM_LABELS, "cpu")
    restored.load_state_tensors(load_file(str(path)))
    assert_same_bank(original, restored)

    # The next enqueue behaves the same too, including invalidating an id the checkpoint holds.
    visual_bD, text_bD, labels_bV, _ = rows_for(4, 0)
    resident_id = int(original.ordered_view()["sample_ids"][-1])
    next_ids_b = torch.tensor([resident_id, 900, 901])
    for bank in (original, restored):
        bank.enqueue(visual_bD, text_bD, labels_bV, next_ids_b, step=4, ctx=DataParallelContext())
    assert_same_bank(original, restored)
    assert valid_id_counts(restored)[resident_id] == 1


@pytest.mark.parametrize(
    "size, embed_dim, num_labels, named",
    [
        (16, EMBED_DIM, NUM_LABELS, "size 8 (this run: 16)"),
        (8, 5, NUM_LABELS, "embed_dim 4 (this run: 5)"),
        (8, EMBED_DIM, 7, "num_labels 3 (this run: 7)"),
    ],
)
def test_a_checkpoint_of_another_geometry_is_refused(tmp_path, size, embed_dim, num_labels, named):
    path = tmp_path / "bank.safetensors"
    save_file(filled_bank().state_tensors(), str(path))
    other = MemoryBank(size, embed_dim, num_labels, "cpu")
    with pytest.raises(UserError) as raised:
        other.load_state_tensors(load_file(str(path)))
    message = str(raised.value)
    assert named in message and "\n" not in message
    assert other.enqueued_count == 0 and not other.view()["valid"].any()  # nothing half-loaded


def test_bank_geometry_at_real_rank_counts():
    check_bank_geometry(65_536, world_size=128, micro_batch_size=32)  # 4,096 rows per step, 16 steps held
    check_bank_geometry(65_536, world_size=1, micro_batch_size=1)
    with pytest.raises(UserError, match=r"3072 rows .* 64512 or 67584"):
        check_bank_geometry(65_536, world_size=96, micro_batch_size=32)
    with pytest.raises(UserError, match=r"nearest sizes that work: 128$"):
        check_bank_geometry(100, world_size=4, micro_batch_size=32)
    with pytest.raises(UserError, match=r"nearest sizes that work: 8$"):
        check_bank_geometry(0, world_size=2, micro_batch_size=4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_buffers_stay_on_the_bank_device(device):
    bank = MemoryBank(8, EMBED_DIM, NUM_LABELS, device)
    for step in range(3):
        bank.enqueue(*rows_for(step, 0, device), step=step, ctx=DataParallelContext(device=torch.device(device)))
    for views in (bank.view(), bank.ordered_view()):
        assert {name: tensor.device for name, tensor in views.items()} == {name: bank.device for name in FIELDS}

    state = bank.state_tensors()
    assert all(tensor.device.type == "cpu" and tensor.is_contiguous() for tensor in state.values())
    assert len({tensor.untyped_storage().data_ptr() for tensor in state.values()}) == len(state)

    restored = MemoryBank(8, EMBED_DIM, NUM_LABELS, device)
    restored.load_state_tensors(state)
    restored.enqueue(*rows_for(3, 0, device), step=3, ctx=DataParallelContext(device=torch.device(device)))
    for name, tensor in restored.view().items():
        assert tensor.device == restored.device, name
        # Copied into the bank's own buffers, never adopted from the loaded (CPU) tensors.
        assert tensor.untyped_storage().data_ptr() != state[name].untyped_storage().data_ptr(), name
