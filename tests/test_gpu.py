"""On one CUDA device (`pytest -m gpu`; skipped, saying so, where there is none): DeepSpeed on
NCCL in bf16 for 20 steps at ep_size 1, eager and with `train.compile`, with every collective
vlpdist issues checked to be on the GPU, its export folded by `launcher.export`, and the folded
mapper equal to the MoE mapper on the GPU. `launcher/gpu_run.sh` runs these with every other
gpu-marked test and the GPU benchmark in one call. A GPU machine carries neither pycocoevalcap nor
Java: the run's caption metrics are then skipped with the reason (eval.json says which), and the
losses, the export and the fold are still checked."""

from __future__ import annotations

import json
import math

import pytest
import torch
from common_fixtures import free_port
from launcher.export import main as export_main
from train_fixtures import (
    TINY_CONFIG,
    collective_probe_env,
    read_metrics,
    recorded_collectives,
    run_train_main,
    tiny_features,
    tiny_overrides,
)

from vlpdist.train.evaluate import caption_metrics_problem

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_one_rank_bf16_trains_20_steps_on_nccl_with_collectives_on_the_gpu(tiny_lm, tmp_path, compiled):
    features = tiny_features(tmp_path / "features")
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        features, tiny_lm, run_dir, "train.ep_size=1", "train.precision=bf16", "train.max_steps=20",
        "train.checkpoint_every=10", "train.log_every=5", "train.caption_log_every=10", f"train.compile={str(compiled).lower()}",
    )
    probe_log = tmp_path / "collectives"
    env = {**collective_probe_env(probe_log), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = run_train_main(["--config", str(TINY_CONFIG), *overrides], timeout_s=500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all(abs(m["loss"]) < 1e4 for m in metrics)
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["bf16"]["enabled"]
    calls = recorded_collectives(probe_log, 0)
    direct = [call for call in calls if call["direct"]]
    assert len(direct) == 20 + metrics[-1]["nan_skipped"]
    assert {(call["op"], call["caller"]) for call in direct} == {("all_reduce", "engine.py:sum_over_ranks")}
    # NCCL takes CUDA tensors only: every collective made from vlpdist code, DeepSpeed's included.
    assert {call["device"] for call in calls} == {"cuda:0"}, calls
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["samples"] == 48 and math.isfinite(evaluation["caption_loss"])
    problem = caption_metrics_problem()
    if problem is None:
        assert evaluation["metrics"]["CIDEr"] >= 0
    else:
        assert evaluation["caption_metrics_skipped"] == problem and f"caption metrics skipped: {problem}" in result.stdout
    folded = export_main(["--checkpoint", str(run_dir / "export" / "model_fp32.safetensors"), "--out", str(tmp_path / "folded")])
    assert folded["fold_relative_error"] < 1e-4
    assert ("torch.compile: lm, mapper for the training step" in result.stdout) == compiled


def test_folded_mapper_equals_the_moe_mapper_on_the_gpu():
    from vlpdist.config import ModelConfig
    from vlpdist.models import build_mapper, fold_mapper

    torch.manual_seed(0)
    cfg = ModelConfig(prefix_length=10, mapper_depth=2, num_experts=8, top_k=2, kernel_sizes=[3, 5])
    mapper = build_mapper(cfg, 512, 768)
    with torch.no_grad():
        for param in mapper.parameters():
            param.add_(0.02 * torch.randn_like(param))  # away from the identity-like init, as after training
    mapper = mapper.cuda().eval()
    folded = fold_mapper(mapper).cuda().eval()
    for batch in (1, 64, 1024):
        clip_BC = torch.randn(batch, 512, device="cuda")
        with torch.no_grad():
            expected_BPD, _, expected_load = mapper(clip_BC)
            actual_BPD, _, actual_load = folded(clip_BC)
        assert actual_BPD.device.type == "cuda"
        assert float((actual_BPD - expected_BPD).norm() / expected_BPD.norm()) < 1e-4
        assert torch.equal(actual_load, expected_load)
