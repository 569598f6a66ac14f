"""Two real ranks (gloo): the MoE mapper with its experts split over ep_size=2, loaded from a consolidated
state, gives on each rank's batch exactly what the folded single-process mapper gives."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from common_fixtures import free_port

from vlpdist.config import ModelConfig
from vlpdist.models import build_mapper, fold_mapper
from vlpdist.parallel.expert_state import global_to_local_expert_state

CLIP_DIM, WIDTH, EXPERTS, EP_SIZE = 8, 16, 4, 2


def model_config(top_k: int) -> ModelConfig:
    return ModelConfig(prefix_length=3, mapper_depth=2, num_experts=EXPERTS, top_k=top_k, kernel_sizes=[1, 3])


def run_rank(rank: int, port: int, top_k: int, consolidated: dict, inputs: list, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(EP_SIZE), LOCAL_RANK=str(rank))
    from vlpdist.parallel.engine import init_distributed

    init_distributed(120)  # not deepspeed.init_distributed: ours skips the CPU shm op's minute-long JIT build
    mapper = build_mapper(model_config(top_k), CLIP_DIM, WIDTH, ep_size=EP_SIZE)
    for block in mapper.blocks:
        # What DeepSpeed's engine does when it wraps the model: create and attach the expert-parallel group.
        block.moe.set_deepspeed_parallelism()
    mapper.load_state_dict(global_to_local_expert_state(consolidated, rank, EXPERTS // EP_SIZE))
    with torch.no_grad():
        results[rank] = mapper.eval()(inputs[rank])[0]
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [1, EXPERTS])
def test_expert_parallel_forward_matches_fold(top_k):
    torch.manual_seed(top_k)
    reference = build_mapper(model_config(top_k), CLIP_DIM, WIDTH)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.2 * torch.randn_like(param))
    consolidated = reference.state_dict()
    # Unequal batches per rank: eval capacity is agreed across the expert-parallel group.
    inputs = [torch.randn(5, CLIP_DIM), torch.randn(9, CLIP_DIM)]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(run_rank, args=(free_port(), top_k, consolidated, inputs, results), nprocs=EP_SIZE, join=True)
        outputs = dict(results)
    folded = fold_mapper(reference)
    with torch.no_grad():
        for rank in range(EP_SIZE):
            expected = folded(inputs[rank])[0]
            assert float((outputs[rank] - expected).norm() / expected.norm()) < 1e-5
