"""DeepSpeed engine set-up: process group, MoE optimizer groups, the engine; and the collectives the loop needs.

This is the one place that wraps the model for distribution (the model only receives `ep_size`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from vlpdist.atomic import atomic_write_json
from vlpdist.config import TrainConfig
from vlpdist.parallel.deepspeed_config import build_deepspeed_config


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    on_gpu: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float) -> DistInfo:
    """Join the process group from the launcher's env (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    The timeout bounds every collective: if a peer dies, the survivors fail instead of hanging."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    accelerator = get_accelerator()
    on_gpu = accelerator.device_name() == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        accelerator.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, on_gpu)


def device_of(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if info.on_gpu else torch.device("cpu")


def build_engine(model: nn.Module, train: TrainConfig, info: DistInfo, run_dir: Path):
    """The DeepSpeed engine over `model`'s trainable parameters, MoE experts in their own groups.

    Writes the generated DeepSpeed JSON into the run folder (for reference; the config is the truth).
    Returns (engine, lr_scheduler)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    ds_config = build_deepspeed_config(train, info.world_size, info.on_gpu)
    if info.is_main:
        atomic_write_json(run_dir / "deepspeed_config.json", ds_config)
    trainable = [param for param in model.parameters() if param.requires_grad]
    # Expert params are reduced over the expert-data-parallel group, not the whole world, so
    # DeepSpeed needs them in separate optimizer groups (one per expert group name).
    groups = split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "dense"})
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine, scheduler


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (a MAX all-reduce)."""
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a small float tensor over all ranks."""
    import torch.distributed as dist

    values = values.detach().float().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's index inside its expert-parallel group (which experts it holds)."""
    from deepspeed.utils import groups

    if ep_size == 1:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group=groups._get_expert_parallel_group(f"ep_size_{ep_size}"))


def consolidated_state_dict(module: nn.Module, ep_size: int, include_lm: bool) -> dict[str, torch.Tensor] | None:
    """Collective: all experts by global id plus the dense params, fp32 on CPU, on rank 0 (None elsewhere).

    Trainable params come from ZeRO's fp32 master copies (`safe_get_full_fp32_param`, gathered from
    the optimizer partitions), so a bf16 run exports its full-precision weights. Rank 0 holds the
    dense params and EP rank 0's experts; the other ranks of its expert-parallel group (ranks
    1 .. ep_size-1, the layout being rank % ep_size) send only their experts, and every other rank
    holds replicas, so sends nothing. A frozen LM is left out: it is reloaded from `model.lm_name`."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from vlpdist.models.expert_state import local_to_global_expert_state

    state = dict(module.state_dict())
    for name, param in module.named_parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)  # every rank must ask, in the same order
            state[name] = master if master is not None else param
    rank = dist.get_rank()

    def sent_by_this_rank(name: str) -> bool:
        if not include_lm and name.startswith("lm."):
            return False
        return rank == 0 or (rank < ep_size and ".deepspeed_experts." in name)

    local = {
        name: tensor.detach().float().cpu()
        for name, tensor in local_to_global_expert_state(state, expert_parallel_rank(ep_size), module.experts_per_rank).items()
        if sent_by_this_rank(name)
    }
    is_main = rank == 0
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.gather_object(local, gathered if is_main else None, dst=0)
    if not is_main:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged
