"""The data-parallel context a loss or the memory bank gathers over, and the gather they use.

Keys from other ranks come from the momentum model (or the online model's detached outputs),
so no gather needs to carry gradients back.

A loss receives a `DataParallelContext` instead of reaching for the default process group, so
the same code runs in one process (world size 1: the gathers return their input) and on N ranks.
Tensors must already sit on the training device: NCCL accepts CUDA tensors only, and gloo on
CPU would not show a CPU tensor sent to it, so the gathers check the device themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataParallelContext:
    """Who gathers with whom. `group` None means the default process group (when initialised)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: object | None = None

    @classmethod
    def from_default_group(cls, device: torch.device) -> "DataParallelContext":
        """The context of the initialised default group, or a single-process one when there is none."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=torch.device(device))
        return cls(dist.get_rank(), dist.get_world_size(), torch.device(device))

    def check_device(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device.type:
            raise RuntimeError(f"collective on a {tensor.device} tensor; this data-parallel group works on {self.device}")


def all_gather_no_grad(tensor: torch.Tensor, ctx: DataParallelContext) -> torch.Tensor:
    """(b, ...) per rank -> (world_size * b, ...), rank 0's rows first; detached. Every rank must pass the same shape."""
    if ctx.world_size == 1:
        return tensor.detach()
    import torch.distributed as dist

    ctx.check_device(tensor)
    tensor = tensor.detach().contiguous()
    out = torch.empty((ctx.world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    # `all_gather_single` is the newer torch name of `all_gather_into_tensor`; the lent GPU machine's
    # torch (2.11) has only the older one: the same collective either way.
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_into(out, tensor, group=ctx.group)
    return out
