"""DeepSpeed engine set-up: process group, optimizer groups, the engine; and the collectives the loop needs.

This is the one place that wraps the model for distribution (the model only receives `ep_size`).
Tensor collectives take the engine's device explicitly and refuse a tensor elsewhere: NCCL, the
backend DeepSpeed creates on GPUs, accepts CUDA tensors only, so a CPU tensor reduced there
crashes the run; gloo on CPU would never show it. Object collectives (plans, manifests,
checksums) let torch place their buffers on the current device.
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


def init_distributed(timeout_s: float, rendezvous_timeout_s: float | None = None) -> DistInfo:
    """Join the process group from the launcher's env (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    `timeout_s` bounds every collective: if a peer dies, the survivors fail instead of hanging.
    Joining waits up to `rendezvous_timeout_s` (default: the same) for every rank to arrive: ranks
    start unevenly on a busy cluster (images, imports, a shared file system), which says nothing
    about a dead peer. So the TCP store is made here with the joining patience, then DeepSpeed
    takes over the initialised group."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from vlpdist.errors import UserError
    from vlpdist.parallel.launch import free_server_ports

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # One process on its own has no peer to agree on a port with: any free one will do.
        os.environ["MASTER_PORT"] = str(free_server_ports(1)[0]) if os.environ["WORLD_SIZE"] == "1" else "29500"
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        # DeepSpeed's CPU shared-memory collective serves only `inference_all_reduce` (tensor-parallel
        # inference), never training. Its JIT build takes a minute under a lock in the shared
        # torch_extensions cache and is redone whenever another launcher's flags differ, so ranks
        # would wait on it at start; mark it unavailable so DeepSpeed does not build it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = accelerator.communication_backend_name()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent already serves the store on MASTER_PORT: join it the standard way.
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    elif not dist.is_initialized():
        try:
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=rank == 0,
                timeout=timedelta(seconds=max(rendezvous_timeout_s or timeout_s, timeout_s)),
            )
        except dist.DistNetworkError as err:
            if rank == 0 and "EADDRINUSE" in str(err):
                raise UserError(
                    f"the rendezvous port {os.environ['MASTER_PORT']} (MASTER_PORT) is taken on this machine, by another "
                    "run or service: set MASTER_PORT (or the launcher's --master_port) to a free port"
                ) from None
            raise
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    on_gpu = accelerator.device_name() == "cuda"
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        accelerator.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, on_gpu)


def device_of(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if info.on_gpu else torch.device("cpu")


def no_decay_parameter(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases (anything under 2-D) and the MoE routers take no weight decay:
    decaying a router's logits pulls it towards uniform routing, and norms/biases are not weights."""
    return param.ndim < 2 or ".gate." in name


def build_engine(model: nn.Module, train: TrainConfig, info: DistInfo, run_dir: Path, optimizer_params: dict | None = None):
    """The DeepSpeed engine over `model`'s trainable parameters, MoE experts in their own groups.
    `optimizer_params` go over the generated optimizer params (the benchmark's unfused-AdamW row).

    Writes the generated DeepSpeed JSON into the run folder (for reference; the config is the truth).
    Returns (engine, lr_scheduler)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    ds_config = build_deepspeed_config(train, info.world_size, info.on_gpu)
    ds_config["optimizer"]["params"].update(optimizer_params or {})
    if info.is_main:
        atomic_write_json(run_dir / "deepspeed_config.json", ds_config)
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    decay = [param for name, param in trainable if not no_decay_parameter(name, param)]
    no_decay = [param for name, param in trainable if no_decay_parameter(name, param)]
    # Expert params are reduced over the expert-data-parallel group, not the whole world, so
    # DeepSpeed needs them in separate optimizer groups (one per expert group name).
    groups = split_params_into_different_moe_groups_for_optimizer([
        {"params": decay, "name": "decay"},
        {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
    ])
    groups = [group for group in groups if group["params"]]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    # DeepSpeed's WarmupCosineLR starts at iteration -1, where its lr is 0: the first step would
    # be wasted. From iteration 0 the warmup starts at its floor (warmup_min_ratio > 0); a resume
    # overwrites this with the saved scheduler state.
    scheduler.step(0)
    return engine, scheduler


def leave_process_group() -> None:
    """Destroy the default process group, if this process joined one, while the interpreter still runs. Left to
    interpreter exit, gloo's worker threads can be torn down while joinable (std::terminate: SIGABRT), which
    turns a rank's one-line exit 2 into a crash (seen when every rank refused the data plan)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _check_device(tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise RuntimeError(f"collective on a {tensor.device} tensor; the engine runs on {device} (NCCL takes CUDA tensors only)")


def sum_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum over all ranks of a tensor already on the engine's `device`: one all-reduce, no host sync."""
    import torch.distributed as dist

    _check_device(values, device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_main(value, device: torch.device):
    """Rank 0's `value` on every rank (pickled, so only between our own ranks)."""
    import torch.distributed as dist

    holder = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0, device=device)
    return holder[0]


def gather_to_main(value) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_gather_values(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


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
    holds replicas, so sends nothing. A frozen LM is left out: it is reloaded from `model.lm_name`.

    Streamed one tensor at a time, so no device holds more than one tensor beyond the model: each
    master is moved to CPU as soon as it is assembled (and dropped by the ranks that do not keep it),
    then each expert tensor of ranks 1 .. ep_size-1 goes to rank 0 point to point, through one buffer
    on the model's device (NCCL takes CUDA tensors only). A `gather_object` of whole states instead
    pads every rank's payload to the largest (rank 0's: the dense params, the LM too when tuned)
    and allocates world x that on rank 0's GPU."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from vlpdist.parallel.expert_state import local_to_global_expert_state

    rank = dist.get_rank()

    def kept_by_this_rank(name: str) -> bool:
        if not include_lm and name.startswith("lm."):
            return False
        return rank == 0 or (rank < ep_size and _is_expert_param(name))

    masters: dict[int, torch.Tensor] = {}  # by the param's id: a tied alias in the state dict gets the master too
    for name, param in module.named_parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)  # every rank must ask, in the same order
            if kept_by_this_rank(name):
                masters[id(param)] = (master if master is not None else param).detach().float().cpu()
            del master
    local: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not kept_by_this_rank(name):
            continue
        value = masters[id(tensor)] if id(tensor) in masters else tensor.detach().float().cpu()
        # A tied alias (GPT-2's lm_head over its token embedding) would hand safetensors two names over one
        # storage, which it refuses: the alias gets its own copy (load_state_dict ties them again).
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        local[name] = value
    experts_per_rank = module.experts_per_rank
    # Every EP rank holds the same local expert names and shapes, so rank 0's own are the receive templates.
    expert_names = [name for name in local if _is_expert_param(name)]
    if rank == 0:
        device = next(module.parameters()).device
        merged = local_to_global_expert_state(local, 0, experts_per_rank)
        for source in range(1, ep_size):
            received = {}
            for name in expert_names:
                buffer = torch.empty_like(local[name], device=device)
                dist.recv(buffer, src=source)
                received[name] = buffer.cpu()
                del buffer
            merged.update(local_to_global_expert_state(received, source, experts_per_rank))
        return merged
    if rank < ep_size:
        device = next(module.parameters()).device
        for name in expert_names:
            dist.send(local[name].to(device), dst=0)
    return None


def _is_expert_param(name: str) -> bool:
    return ".deepspeed_experts." in name
