"""Real DeepSpeed training on 2 CPU ranks (gloo): ZeRO 1/2, expert parallelism 2/1, exact resume,
resume refused (or re-planned) when the data plan changed, damaged-checkpoint fallback, the
consolidated export reloaded at another size, TensorBoard, one collective per step."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from common_fixtures import free_port
from export_fixtures import tiny_clip_provenance
from train_fixtures import (
    TINY_CONFIG,
    collective_probe_env,
    evaluate_export_in_one_rank,
    launch,
    read_metrics,
    recorded_collectives,
    run_train_main,
    seed_checkpoints,
    tiny_features,
    tiny_overrides,
)

from launcher.paths import TRAIN_SCRIPT
from vlpdist.data.provenance import read_provenance, write_provenance
from vlpdist.parallel.launch import run_deepspeed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Two samples of training shard 0 have NaN embeddings: their micro-batches must be skipped and counted.
NAN_KEYS = frozenset({"000000003", "000000021"})


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_lm, tiny_clip):
    features = tiny_features(tmp_path_factory.mktemp("ep2") / "features", nan_keys=NAN_KEYS)
    write_provenance(features, tiny_clip_provenance(tiny_clip))  # as processing leaves it: training copies it into the run
    return features, tiny_lm


@pytest.fixture(scope="module")
def ep2_run(world, tmp_path_factory):
    """12 steps, ZeRO-2, experts spread over both ranks (ep_size 2); checkpoints at 6 and 12; the
    tensor collectives vlpdist issues recorded into <run>/../collectives."""
    features, lm_dir = world
    run_dir = tmp_path_factory.mktemp("ep2_run")
    env = collective_probe_env(run_dir.parent / f"{run_dir.name}_collectives")
    result = launch(tiny_overrides(features, lm_dir, run_dir, "train.zero_stage=2", "train.ep_size=2"), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_vlpdist_issues_one_collective_per_optimizer_step_on_the_engine_device(ep2_run):
    run_dir, _ = ep2_run
    metrics = read_metrics(run_dir)
    steps_taken = len(metrics) + metrics[-1]["nan_skipped"]  # applied and skipped steps
    for rank in (0, 1):
        calls = recorded_collectives(run_dir.parent / f"{run_dir.name}_collectives", rank)
        # vlpdist's own tensor collectives: the fused per-step all-reduce (terms, load, flags) and
        # nothing else (object collectives go through torch's own helpers). The rest are DeepSpeed's,
        # called from our frames (forward, backward, step, export), on the same device.
        direct = [call for call in calls if call["direct"]]
        assert len(direct) == steps_taken, direct
        assert {(call["op"], call["caller"]) for call in direct} == {("all_reduce", "engine.py:sum_over_ranks")}
        assert len(calls) > len(direct)
        assert {call["device"] for call in calls} == {"cpu"}  # the engine's device here; tests/test_gpu.py checks cuda


def result_text(ep2_run) -> str:
    return ep2_run[1].stdout


def test_ep2_zero2_trains_with_finite_decreasing_loss_and_skips_nan_batches(ep2_run):
    run_dir, _ = ep2_run
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    losses = [m["loss"] for m in metrics]
    assert all(abs(loss) < 1e6 for loss in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    # Two NaN embeddings in training shard 0: their steps were skipped (not counted as steps) on both ranks.
    assert metrics[-1]["nan_skipped"] >= 1
    assert "plan" in result_text(ep2_run) and "0 samples (0.00 %) left out per epoch" in result_text(ep2_run)
    ds_config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["train_batch_size"] == 8 * 1 * 2
    assert ds_config["scheduler"]["params"]["total_num_steps"] == 12
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000012"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000012"]
    # DeepSpeed lays experts out one file per global expert.
    assert len(list((run_dir / "checkpoints" / "step_00000012").glob("layer_0_expert_*_model_states.pt"))) == 4


def test_export_holds_every_expert_and_eval_json_has_losses_and_metrics(ep2_run, world):
    from safetensors.torch import load_file

    run_dir, result = ep2_run
    state = load_file(str(run_dir / "export" / "model_fp32.safetensors"))
    experts = {key.split("deepspeed_experts.")[1].split(".")[0] for key in state if "deepspeed_experts." in key}
    assert experts == {"0", "1", "2", "3"}
    assert not any(key.startswith("lm.") for key in state)  # frozen LM: reloaded from model.lm_name
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["samples"] == 48
    # 12 steps are too few to beat the LM without the image; the demo run shows that comparison.
    assert 0 < evaluation["caption_loss"] < 20 and 0 < evaluation["lm_without_image_loss"] < 20
    assert {"BLEU-4", "CIDEr"} <= set(evaluation["metrics"]) <= set(evaluation["most_frequent_caption_metrics"])
    assert "held-out" in result.stdout
    assert read_provenance(run_dir) == read_provenance(world[0]) is not None  # copied at the run's set-up


def test_resume_mid_epoch_matches_straight_run_and_skips_damaged_latest(ep2_run, world, tmp_path):
    straight_dir, _ = ep2_run
    features, lm_dir = world
    checkpoints = seed_checkpoints(straight_dir, tmp_path, ["step_00000006", "step_00000012"], latest="step_00000012")
    damaged = checkpoints / "step_00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    # The events of the straight run up to step 12 are there, as after a run killed past step 6.
    shutil.copytree(straight_dir / "tb", tmp_path / "tb")
    # Steps 1..6 were 96 samples per rank of 240 training samples: resuming mid-epoch.
    result = launch(tiny_overrides(features, lm_dir, tmp_path, "train.eval_at_end=false", "train.export_at_end=false"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step_00000012 skipped" in result.stderr
    assert "resumed from step 6" in result.stdout
    resumed = read_metrics(tmp_path)
    straight = read_metrics(straight_dir)[6:]
    assert [m["step"] for m in resumed] == list(range(7, 13))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in straight]
    assert (checkpoints / "latest").read_text() == "step_00000012"
    # TensorBoard: the resumed writer purges from step 7, so the curve is steps 2..12 once, not doubled back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max((tmp_path / "tb").glob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime)
    accumulator = EventAccumulator(str(newest.parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("loss/cap")] == [2, 4, 6, 8, 10, 12]


def test_resume_with_another_data_plan_is_refused_naming_the_change_or_replanned(ep2_run, world, tmp_path):
    straight_dir, _ = ep2_run
    features, lm_dir = world
    shutil.copytree(straight_dir / "checkpoints" / "step_00000006", tmp_path / "checkpoints" / "step_00000006")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000006")
    refused = launch(tiny_overrides(features, lm_dir, tmp_path, "train.micro_batch_size=4", "train.num_workers=2"))
    assert refused.returncode != 0
    assert ("error: checkpoint step_00000006 was made with another data plan (num_workers 1 -> 2; micro_batch_size 8 -> 4)"
            in refused.stderr), refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    # Another shard list (shard 00004 gone), re-planned on request: the new plan starts at epoch 1
    # (step 6 was 6 of the 15 micro-batches of epoch 0).
    fewer = tmp_path / "fewer_features"
    fewer.mkdir()
    for path in features.iterdir():
        if not path.name.startswith("00004"):
            shutil.copy(path, fewer / path.name)
    replanned = launch(tiny_overrides(fewer, lm_dir, tmp_path, "train.replan_on_resume=true", "train.eval_at_end=false",
                                      "train.export_at_end=false"))
    assert replanned.returncode == 0, replanned.stdout[-3000:] + replanned.stderr[-3000:]
    assert ("re-planned on resume from step_00000006 (training shards: 1 removed (e.g. 00004.tar)): the new plan "
            "starts at epoch 1 (the rest of epoch 0 is not read)") in replanned.stdout
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(7, 13)) and {m["epoch"] for m in metrics} == {1}


def test_export_from_ep2_reloads_in_one_rank_with_ep1_and_same_eval_loss(ep2_run, world, tmp_path):
    straight_dir, _ = ep2_run
    features, lm_dir = world
    reloaded, original = evaluate_export_in_one_rank(features, lm_dir, straight_dir / "export", tmp_path)
    assert reloaded["caption_loss"] == pytest.approx(original["caption_loss"], rel=1e-5)
    assert reloaded["lm_without_image_loss"] == pytest.approx(original["lm_without_image_loss"], rel=1e-6)
    assert [e["generated"] for e in reloaded["examples"]] == [e["generated"] for e in original["examples"]]


def test_tensorboard_events_hold_every_logged_tag(ep2_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = ep2_run
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    expected = {"loss/loss", "loss/cap", "loss/moe_aux", "opt/lr", "opt/grad_norm", "throughput/samples_per_s",
                "throughput/tokens_per_s", "data/nan_skipped"} | {f"moe/expert_load/{e}" for e in range(4)}
    assert expected <= scalars
    assert [event.step for event in accumulator.Scalars("loss/cap")] == [2, 4, 6, 8, 10, 12]
    load = [accumulator.Scalars(f"moe/expert_load/{e}")[-1].value for e in range(4)]
    assert sum(load) == pytest.approx(1.0, abs=1e-4)
    assert "captions/sample/text_summary" in accumulator.Tags()["tensors"]


def test_ep1_zero1_loss_decreases_on_a_fixed_batch(world, tmp_path):
    _, lm_dir = world
    features = tiny_features(tmp_path / "features", num_shards=3, samples_per_shard=16, repeat_first=True)
    overrides = tiny_overrides(
        features, lm_dir, tmp_path / "run", "train.zero_stage=1", "train.ep_size=1", "train.max_steps=6",
        "train.warmup_steps=1", "train.min_lr_ratio=1.0", "train.lr=1e-3", "train.eval_at_end=false",
        "train.export_at_end=false", "train.caption_log_every=0",
    )
    assert run_deepspeed(TRAIN_SCRIPT, TINY_CONFIG, overrides, num_procs=2, master_port=free_port()) == 0
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 6
    # The warmup starts above zero: the first step already lowers the loss, and every step after it.
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    ds_config = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 1


def test_no_heldout_shards_trains_and_skips_evaluation(world, tmp_path):
    features, lm_dir = world
    overrides = tiny_overrides(features, lm_dir, tmp_path / "run", "train.heldout_shards=0", "train.ep_size=1",
                               "train.max_steps=2", "train.caption_log_every=0")
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = run_train_main(["--config", str(TINY_CONFIG), *overrides], timeout_s=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no held-out shards (train.heldout_shards=0): evaluation skipped" in result.stdout
    assert "288 training samples in 6 shards" in result.stdout
    assert not (tmp_path / "run" / "eval.json").exists() and (tmp_path / "run" / "export").is_dir()


def test_compiled_training_runs_with_expert_parallel_all_to_all(world, tmp_path):
    """`train.compile=true` on 2 gloo ranks at ep_size 2: the compiled LM and mapper train (DeepSpeed's
    gradient hooks and the experts' all-to-all under torch.compile), switch to eager for the sample
    captions and the held-out evaluation, and the run says what was compiled."""
    features, lm_dir = world
    overrides = tiny_overrides(features, lm_dir, tmp_path / "run", "train.compile=true", "train.max_steps=3",
                               "train.caption_log_every=2", "train.log_every=1", "train.eval_max_samples=16")
    result = launch(overrides, timeout_s=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch.compile: lm, mapper for the training step" in result.stdout
    (summary,) = [line for line in result.stdout.splitlines() if line.startswith("torch.compile: ") and "graphs" in line]
    graphs = int(summary.split()[1])
    assert graphs >= 2, summary  # at least the LM's graph and the mapper's
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["samples"] == 16
    # The tiny recipe evaluates 8 new tokens of captions trained at up to 16: the run says so.
    assert "note: greedy captions are cut at train.eval_max_new_tokens=8 new tokens, fewer than the model.max_caption_tokens=16" in result.stdout
