"""The contrastive memory bank: a fixed-size FIFO of past keys on the training device (MoCo, ALBEF).

Every optimizer micro-step, each rank's momentum-model embeddings, labels and sample ids are
gathered over the data-parallel group and written at the write pointer, overwriting the oldest
rows. Every rank therefore holds the same bank, and the losses read it without communicating.

The enqueue is index arithmetic on device tensors only: a host sync per micro-step (`.item()`,
`.tolist()`, a `nonzero` whose output shape depends on the data) would stall the GPU pipeline.
The write pointer and the count of rows ever enqueued are Python ints: they advance by the
number of gathered rows, which the host knows from the tensor shapes.

A sample id appears at most once among the valid rows (with `unique_ids`): a sample seen again,
in a later epoch or twice in one gather, would otherwise be its own negative.
"""

from __future__ import annotations

import torch

from vlpdist.errors import UserError
from vlpdist.losses.distributed import DataParallelContext, all_gather_no_grad

DEFAULT_BANK_SIZE = 65_536
EMPTY_SAMPLE_ID = -1

BUFFER_NAMES = ("visual", "text", "labels", "sample_ids", "entered_step", "valid")
STATE_NAMES = (*BUFFER_NAMES, "write_pointer", "enqueued_count")


def check_bank_geometry(size: int, world_size: int, micro_batch_size: int) -> None:
    """UserError unless `size` is a positive multiple of the rows one micro-step enqueues (world_size * micro_batch_size).

    Then every gathered block lands in one contiguous run of slots, and the bank holds exactly
    size / rows_per_step whole micro-steps: no step's rows are ever half overwritten.
    """
    rows_per_step = world_size * micro_batch_size
    if rows_per_step <= 0:
        raise UserError(f"memory bank: world_size ({world_size}) x micro_batch_size ({micro_batch_size}) must be positive")
    if size > 0 and size % rows_per_step == 0:
        return
    below = (size // rows_per_step) * rows_per_step
    candidates = [n for n in (below, below + rows_per_step) if n > 0]
    raise UserError(
        f"memory bank size {size} is not a positive multiple of world_size x micro_batch_size = "
        f"{world_size} x {micro_batch_size} = {rows_per_step} rows enqueued per micro-step; "
        f"nearest sizes that work: {' or '.join(str(n) for n in candidates)}"
    )


def keep_last_occurrence(sample_ids_M: torch.Tensor) -> torch.Tensor:
    """(M,) int64 -> (M,) bool: True at the last occurrence of each id, on the ids' device without a host sync.

    A stable sort keeps equal ids in their original order, so the last of each run of equal
    sorted ids is that id's last occurrence in the input.
    """
    sorted_ids_M, order_M = torch.sort(sample_ids_M, stable=True)
    last_in_run_M = torch.ones_like(sorted_ids_M, dtype=torch.bool)
    last_in_run_M[:-1] = sorted_ids_M[1:] != sorted_ids_M[:-1]
    keep_M = torch.empty_like(last_in_run_M)
    keep_M[order_M] = last_in_run_M
    return keep_M


class MemoryBank:
    """N rows of (visual, text, labels, sample id, entered step, valid), written FIFO at a wrapping pointer."""

    def __init__(self, size: int, embed_dim: int, num_labels: int, device, *, unique_ids: bool = True):
        if size <= 0 or embed_dim <= 0 or num_labels < 0:
            raise ValueError(f"memory bank needs size > 0, embed_dim > 0, num_labels >= 0; got {size}, {embed_dim}, {num_labels}")
        self.size = size
        self.embed_dim = embed_dim
        self.num_labels = num_labels
        # The concrete device ("cuda" -> "cuda:0"), so that it compares equal to the buffers' own `.device`.
        self.device = torch.empty(0, device=device).device
        self.unique_ids = unique_ids
        on_device = dict(device=self.device)
        self.visual_ND = torch.zeros(size, embed_dim, dtype=torch.float32, **on_device)
        self.text_ND = torch.zeros(size, embed_dim, dtype=torch.float32, **on_device)
        self.labels_NV = torch.zeros(size, num_labels, dtype=torch.float32, **on_device)
        self.sample_ids_N = torch.full((size,), EMPTY_SAMPLE_ID, dtype=torch.int64, **on_device)
        self.entered_step_N = torch.full((size,), -1, dtype=torch.int64, **on_device)
        self.valid_N = torch.zeros(size, dtype=torch.bool, **on_device)
        self.write_pointer = 0  # the slot the next row goes to: the oldest row once the bank is full
        self.enqueued_count = 0  # rows ever enqueued (all ranks together)

    def enqueue_gathered(self, visual_MD, text_MD, labels_MV, sample_ids_M, step: int) -> None:
        """Write M rows already gathered from every rank (rank order) at the pointer, wrapping around.

        With `unique_ids`, older rows holding an id being enqueued are invalidated first, and of
        several new rows with one id only the last stays valid. Rows with id -1 are padding and
        enter invalid. No host sync.
        """
        rows = sample_ids_M.shape[0]
        self.check_rows(visual_MD, text_MD, labels_MV, sample_ids_M)
        # (M,) slots, oldest-to-newest order of the new rows preserved across the wrap.
        slots_M = (torch.arange(rows, device=self.device) + self.write_pointer) % self.size
        sample_ids_M = sample_ids_M.to(torch.int64)
        valid_M = sample_ids_M != EMPTY_SAMPLE_ID
        if self.unique_ids:
            self.valid_N &= ~torch.isin(self.sample_ids_N, sample_ids_M)
            valid_M &= keep_last_occurrence(sample_ids_M)
        # The bank keeps float32 whatever precision the model ran in; labels may arrive as bool.
        self.visual_ND.index_copy_(0, slots_M, visual_MD.detach().to(torch.float32))
        self.text_ND.index_copy_(0, slots_M, text_MD.detach().to(torch.float32))
        self.labels_NV.index_copy_(0, slots_M, labels_MV.detach().to(torch.float32))
        self.sample_ids_N.index_copy_(0, slots_M, sample_ids_M)
        self.entered_step_N.index_fill_(0, slots_M, step)
        self.valid_N.index_copy_(0, slots_M, valid_M)
        self.write_pointer = (self.write_pointer + rows) % self.size
        self.enqueued_count += rows

    def enqueue(self, visual_bD, text_bD, labels_bV, sample_ids_b, step: int, ctx: DataParallelContext) -> None:
        """Gather this rank's b rows from every rank (one float gather, one int64 gather) and enqueue the world * b rows."""
        # (b, 2D + V): labels may arrive as bool and embeddings as bf16; the bank stores float32.
        floats_bF = torch.cat([part.detach().to(torch.float32) for part in (visual_bD, text_bD, labels_bV)], dim=1)
        floats_MF = all_gather_no_grad(floats_bF, ctx)  # (world * b, 2D + V), rank 0's rows first
        sample_ids_M = all_gather_no_grad(sample_ids_b.to(torch.int64), ctx)
        visual_MD, text_MD, labels_MV = torch.split(floats_MF, [self.embed_dim, self.embed_dim, self.num_labels], dim=1)
        self.enqueue_gathered(visual_MD, text_MD, labels_MV, sample_ids_M, step)

    def check_rows(self, visual_MD, text_MD, labels_MV, sample_ids_M) -> None:
        """Shapes only (host metadata, no sync): a mismatch here is a bug in the caller."""
        rows = sample_ids_M.shape[0]
        expected = {"visual": (rows, self.embed_dim), "text": (rows, self.embed_dim), "labels": (rows, self.num_labels)}
        for name, tensor in (("visual", visual_MD), ("text", text_MD), ("labels", labels_MV)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"memory bank enqueue: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        if sample_ids_M.dim() != 1 or rows > self.size:
            # More rows than slots would write some slots twice in one index_copy_, in no defined order.
            raise ValueError(f"memory bank enqueue: sample_ids shape {tuple(sample_ids_M.shape)}; at most {self.size} rows, 1-D")

    def view(self) -> dict[str, torch.Tensor]:
        """The whole (N, ...) buffers in slot order (the bank's own tensors, not copies)."""
        return {
            "visual": self.visual_ND,
            "text": self.text_ND,
            "labels": self.labels_NV,
            "sample_ids": self.sample_ids_N,
            "entered_step": self.entered_step_N,
            "valid": self.valid_N,
        }

    def ordered_view(self) -> dict[str, torch.Tensor]:
        """Every row, oldest first (never-written rows count as oldest); newest last. Copies."""
        return {name: torch.roll(buffer, -self.write_pointer, dims=0) for name, buffer in self.view().items()}

    @property
    def fill(self) -> int:
        """Rows currently valid. Syncs with the device: for logging only."""
        return int(self.valid_N.sum())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a bit-exact resume needs, as separate contiguous CPU tensors for safetensors.

        Copies, so that the snapshot does not change under a checkpoint writer while training
        goes on, and on the CPU, because the file is written from there anyway.
        """
        state = {name: buffer.detach().to("cpu", copy=True).contiguous() for name, buffer in self.view().items()}
        state["write_pointer"] = torch.tensor(self.write_pointer, dtype=torch.int64)
        state["enqueued_count"] = torch.tensor(self.enqueued_count, dtype=torch.int64)
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a `state_tensors()` snapshot into this bank's device buffers; UserError if its geometry differs."""
        missing = [name for name in STATE_NAMES if name not in tensors]
        if missing:
            raise UserError(f"memory bank checkpoint lacks {', '.join(missing)}")
        saved = {
            "size": tensors["sample_ids"].shape[0],
            "embed_dim": tensors["visual"].shape[-1],
            "num_labels": tensors["labels"].shape[-1],
        }
        ours = {"size": self.size, "embed_dim": self.embed_dim, "num_labels": self.num_labels}
        differing = [f"{key} {saved[key]} (this run: {ours[key]})" for key in ours if saved[key] != ours[key]]
        if differing:
            raise UserError(f"memory bank checkpoint has {', '.join(differing)}; resume with the bank geometry it was saved with")
        for name, buffer in self.view().items():
            if tuple(tensors[name].shape) != tuple(buffer.shape):
                saved_shape = tuple(tensors[name].shape)
                raise UserError(f"memory bank checkpoint: {name} has shape {saved_shape}, expected {tuple(buffer.shape)}")
        write_pointer = int(tensors["write_pointer"])
        if not 0 <= write_pointer < self.size:
            raise UserError(f"memory bank checkpoint: write_pointer {write_pointer} outside 0..{self.size - 1}")
        for name, buffer in self.view().items():
            # In place: the buffers stay on the bank's device whatever device the tensors were loaded to.
            buffer.copy_(tensors[name])
        self.write_pointer = write_pointer
        self.enqueued_count = int(tensors["enqueued_count"])
