"""Per-EP-rank local expert names <-> global ids, and reloading a consolidated state at another ep_size."""

from __future__ import annotations

import torch

from vlpdist.config import ModelConfig
from vlpdist.models import build_mapper
from vlpdist.parallel.expert_state import global_to_local_expert_state, local_to_global_expert_state

EXPERTS = 4
CFG = ModelConfig(prefix_length=3, mapper_depth=2, num_experts=EXPERTS, top_k=2, kernel_sizes=[3])


def expert_keys(state: dict) -> list[str]:
    return [key for key in state if ".deepspeed_experts." in key]


def test_local_global_round_trip_over_ep_sizes():
    torch.manual_seed(0)
    consolidated = build_mapper(CFG, 8, 16, ep_size=1).state_dict()
    for ep_size in (1, 2, 4):
        per_rank = EXPERTS // ep_size
        shards = [global_to_local_expert_state(consolidated, rank, per_rank) for rank in range(ep_size)]
        # Each rank holds exactly its experts, under local ids 0..per_rank-1, and loads into an ep_size model.
        for shard in shards:
            local_ids = {int(key.split(".deepspeed_experts.")[1].split(".")[0]) for key in expert_keys(shard)}
            assert local_ids == set(range(per_rank))
            build_mapper(CFG, 8, 16, ep_size=ep_size).load_state_dict(shard)
        rebuilt: dict = {}
        for rank, shard in enumerate(shards):
            rebuilt.update(local_to_global_expert_state(shard, rank, per_rank))
        assert rebuilt.keys() == consolidated.keys()
        assert all(torch.equal(rebuilt[key], consolidated[key]) for key in consolidated)


def test_expert_of_rank_one_lands_on_its_global_id():
    state = {
        "blocks.0.moe.deepspeed_moe.experts.deepspeed_experts.1.channel.weight": torch.ones(1),
        "blocks.0.moe.deepspeed_moe.gate.wg.weight": torch.zeros(1),
    }
    renamed = local_to_global_expert_state(state, ep_rank=1, experts_per_rank=2)
    assert set(renamed) == {
        "blocks.0.moe.deepspeed_moe.experts.deepspeed_experts.3.channel.weight",
        "blocks.0.moe.deepspeed_moe.gate.wg.weight",
    }
