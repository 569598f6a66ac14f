"""Optimizer groups and schedule, and a metrics log torn by a killed run."""

from __future__ import annotations

import json

from vlpdist.config import ModelConfig, TrainConfig
from vlpdist.models import build_mapper
from vlpdist.parallel.deepspeed_config import build_deepspeed_config
from vlpdist.parallel.engine import no_decay_parameter
from vlpdist.train.run_setup import truncate_metrics


def test_norms_biases_and_routers_take_no_weight_decay():
    mapper = build_mapper(ModelConfig(prefix_length=3, mapper_depth=2, num_experts=4, top_k=1, kernel_sizes=[3]), 8, 16)
    no_decay = {name for name, param in mapper.named_parameters() if no_decay_parameter(name, param)}
    decay = {name for name, _ in mapper.named_parameters()} - no_decay
    routers = {name for name in no_decay if ".gate." in name}
    assert len(routers) == 2 and all(name.endswith("gate.wg.weight") for name in routers)  # one per MoE block
    assert any("norm" in name for name in no_decay) and any(name.endswith(".bias") for name in no_decay)
    assert decay and all(mapper.get_parameter(name).ndim >= 2 and ".gate." not in name for name in decay)
    assert any("deepspeed_experts" in name for name in decay)


def test_warmup_starts_above_zero_and_bf16_skips_non_finite_steps():
    config = build_deepspeed_config(TrainConfig(warmup_steps=20), world_size=1, on_gpu=True)
    assert config["scheduler"]["params"]["warmup_min_ratio"] == 1 / 20
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed mid-write
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_eval_token_dropping_is_refused_with_expert_parallelism():
    import pytest

    from vlpdist.errors import UserError
    from vlpdist.models.mapper import check_model_config

    check_model_config(ModelConfig(num_experts=4, eval_drop_tokens=True), ep_size=1)
    with pytest.raises(UserError, match="eval_drop_tokens"):
        check_model_config(ModelConfig(num_experts=4, eval_drop_tokens=True), ep_size=2)
