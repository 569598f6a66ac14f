"""Offline consolidation (`python -m launcher.export --checkpoint <DeepSpeed folder>`) of real
checkpoints made by 2 CPU ranks (gloo) with ZeRO-2 and the experts spread over both (ep_size 2).

- The final checkpoint consolidated offline equals the live export of the same run, tensor for
  tensor; in this fp32 run the masters rebuilt from the ZeRO optimizer shards equal the module files.
- A mid-run checkpoint (step 6 of 12) consolidated offline reloads in one rank at ep_size 1 with the
  held-out loss of the live 2-rank model at step 6. That figure comes from a second run that stops
  at step 6: with `train.min_lr_ratio=1` the lr after warmup is constant, so the cosine schedule
  (which spans max_steps) no longer depends on max_steps and both runs take the same first 6 steps;
  the test checks they did (the second run's live export equals the offline step 6, exactly).
- bf16: vlpdist refuses half precision on CPU, so `tests/consolidate_bf16_worker.py` builds the bf16
  DeepSpeed engine itself (both of DeepSpeed's bf16 optimizer-shard formats); the fp32 masters
  consolidated offline equal the live `consolidated_state_dict`, which the module files cannot give.
- 4 ranks at ep_size 2, ZeRO-2, bf16 (the same worker): every expert's fp32 master is split over
  its expert-data-parallel pair of ranks and the experts over the expert-parallel pair, so the
  offline state is assembled from fragments of all 4 ranks. It equals each rank's own experts
  (DeepSpeed's `safe_get_full_fp32_param` there) under global ids and the live export; the live
  export streams one tensor at a time to rank 0 (nothing larger than the largest tensor arrives
  there at once, where a `gather_object` of whole states allocated world x the largest payload);
  `launcher.export` folds it.
- DeepSpeed's misleading `zero_to_fp32.py` is replaced by a note; partial or damaged checkpoint
  folders are refused with a one-line error and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common_fixtures import REPO, free_port
from train_fixtures import TINY_CONFIG, launch, run_train_main, tiny_features, tiny_overrides

from launcher.export import main as export_main
from vlpdist.parallel.consolidate import (
    HOW_TO_EXPORT,
    consolidate_checkpoint,
    replace_deepspeed_consolidation_script,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FINAL_STEP = 12
MID_STEP = 6
# Constant lr after warmup (see the module docstring); checkpoints at 6 and 12, both kept.
RUN_OVERRIDES = ("train.zero_stage=2", "train.ep_size=2", "train.min_lr_ratio=1.0",
                 f"train.checkpoint_every={MID_STEP}", "train.keep_checkpoints=2")
BF16_WORKER = REPO / "tests" / "consolidate_bf16_worker.py"
BF16_FORMATS = {"zero2": "DeepSpeedZeroOptimizer", "zero1_fp32_grad_accum": "BF16_Optimizer"}
EXPORT_WEIGHTS = "model_fp32.safetensors"
EXPERT_KEY = "mapper.blocks.0.moe.deepspeed_moe.experts.deepspeed_experts.{}.channel.weight"


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    differing = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not differing, differing


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_lm):
    return tiny_features(tmp_path_factory.mktemp("consolidate") / "features"), tiny_lm


def train_run(world, run_dir: Path, max_steps: int, *extra: str) -> Path:
    features, lm_dir = world
    result = launch(tiny_overrides(features, lm_dir, run_dir, *RUN_OVERRIDES, f"train.max_steps={max_steps}", *extra))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory) -> Path:
    """12 steps; checkpoints at 6 and 12, the live export at 12 (no evaluation: no test reads it)."""
    return train_run(world, tmp_path_factory.mktemp("full_run"), FINAL_STEP, "train.eval_at_end=false")


@pytest.fixture(scope="module")
def mid_run(world, tmp_path_factory) -> Path:
    """The same run stopped at step 6: its live export and 2-rank eval.json are the live model at step 6."""
    return train_run(world, tmp_path_factory.mktemp("mid_run"), MID_STEP)


@pytest.fixture(scope="module")
def bf16_runs(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(BF16_WORKER),
               "--lm", str(tiny_lm), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for variant, optimizer in BF16_FORMATS.items():  # both shard formats were really written
        assert f"{variant}: {optimizer}," in result.stdout
    return out


@pytest.fixture(scope="module")
def bf16_four_ranks(tiny_lm, tmp_path_factory) -> Path:
    """The worker's ZeRO-2 variant on 4 ranks (3 steps): <out>/zero2/."""
    out = tmp_path_factory.mktemp("bf16_four_ranks")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", "4", "--master_port", str(free_port()), str(BF16_WORKER),
               "--lm", str(tiny_lm), "--out", str(out), "--variants", "zero2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "zero2: DeepSpeedZeroOptimizer," in result.stdout
    return out / "zero2"


def test_four_rank_checkpoint_consolidates_to_every_ranks_own_experts(bf16_four_ranks, tiny_lm, tmp_path):
    from vlpdist.parallel.expert_state import local_to_global_expert_state

    offline = consolidate_checkpoint(bf16_four_ranks / "checkpoints")
    assert (offline.precision, offline.fp32_source) == ("bf16", "optimizer")
    live = load_tensors(bf16_four_ranks / "live_fp32.safetensors")
    assert_same_tensors(offline.state, live)
    experts_per_rank = 2  # 4 experts over ep_size 2
    per_rank = [local_to_global_expert_state(load_tensors(bf16_four_ranks / f"rank{rank}_experts.safetensors"), rank % 2, experts_per_rank)
                for rank in range(4)]
    for rank, experts in enumerate(per_rank):
        assert experts and all(torch.equal(offline.state[name], tensor) for name, tensor in experts.items()), rank
    # Ranks 0, 2 hold experts 0, 1 and ranks 1, 3 experts 2, 3 (replicas within each pair, different across).
    assert sorted(per_rank[0]) == sorted(per_rank[2]) and sorted(per_rank[1]) == sorted(per_rank[3])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(set(per_rank[0]) | set(per_rank[1])) == sorted(name for name in offline.state if ".deepspeed_experts." in name)
    assert all(EXPERT_KEY.format(expert) in per_rank[1] for expert in (2, 3))
    # Rank 0 received rank 1's experts, one tensor per message, and nothing else.
    received = json.loads((bf16_four_ranks / "rank0_received_bytes.json").read_text())
    largest_tensor = max(tensor.numel() * tensor.element_size() for tensor in live.values())
    assert max(received) <= largest_tensor, (max(received), largest_tensor)
    assert sorted(received) == sorted(t.numel() * t.element_size() for t in per_rank[1].values())
    # The export command folds the 4-rank checkpoint: its consolidated weights are the live ones.
    out = tmp_path / "export"
    report = export_main(["--checkpoint", str(bf16_four_ranks / "checkpoints"), "--config", str(TINY_CONFIG), "--out", str(out),
                          f"model.lm_name={tiny_lm}"])
    assert_same_tensors(load_tensors(out / EXPORT_WEIGHTS), live)
    assert report["fold_relative_error"] < 1e-5


def test_final_checkpoint_consolidated_offline_equals_the_live_export(full_run, tmp_path, capsys):
    out = tmp_path / "offline"
    report = export_main(["--checkpoint", str(full_run / "checkpoints"), "--out", str(out)])
    assert f"step_{FINAL_STEP:08d} (step {FINAL_STEP}, fp32 run" in capsys.readouterr().out  # the newest step was chosen
    offline, live = load_tensors(out / EXPORT_WEIGHTS), load_tensors(full_run / "export" / EXPORT_WEIGHTS)
    assert_same_tensors(offline, live)
    assert all(EXPERT_KEY.format(expert) in offline for expert in range(4))  # rank 1's experts under global ids 2, 3
    assert not any(name.startswith("lm.") for name in offline)  # the frozen LM is not in the checkpoint
    meta = json.loads((out / "export.json").read_text())
    assert {key: meta[key] for key in ("clip_dim", "step", "includes_lm")} == json.loads((full_run / "export" / "export.json").read_text())
    assert (out / "config.yaml").read_text() == (full_run / "export" / "config.yaml").read_text()
    assert report["fold_relative_error"] < 1e-5
    # The fold path continues from the consolidated state as from the live export's file.
    from_file = tmp_path / "from_live_file"
    export_main(["--checkpoint", str(full_run / "export" / EXPORT_WEIGHTS), "--out", str(from_file)])
    assert_same_tensors(load_tensors(out / "mapper.safetensors"), load_tensors(from_file / "mapper.safetensors"))


@pytest.mark.parametrize("step", [MID_STEP, FINAL_STEP])
def test_fp32_masters_rebuilt_from_the_optimizer_shards_equal_the_module_files(full_run, step):
    folder = full_run / "checkpoints" / f"step_{step:08d}"
    from_shards = consolidate_checkpoint(folder, fp32_source="optimizer")
    from_modules = consolidate_checkpoint(folder)
    assert (from_modules.fp32_source, from_modules.precision) == ("module", "fp32")
    assert_same_tensors(from_shards.state, from_modules.state)


@pytest.mark.parametrize("variant", list(BF16_FORMATS))
def test_bf16_checkpoint_consolidates_to_the_fp32_masters_of_the_live_model(bf16_runs, variant):
    live = load_tensors(bf16_runs / variant / "live_fp32.safetensors")
    offline = consolidate_checkpoint(bf16_runs / variant / "checkpoints")
    assert (offline.precision, offline.fp32_source) == ("bf16", "optimizer")
    assert_same_tensors(offline.state, live)
    # The module files hold the masters rounded to bf16: reading them instead would not pass above.
    rounded = consolidate_checkpoint(bf16_runs / variant / "checkpoints", fp32_source="module").state
    assert all(torch.equal(rounded[name], live[name].bfloat16().float()) for name in live)
    assert all(not torch.equal(rounded[name], live[name]) for name in live)


def evaluate_in_one_rank(world, export_dir: Path, out_dir: Path) -> dict:
    """`launcher/train.py --evaluate-export` in one process at ep_size 1: its eval.json."""
    features, lm_dir = world
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    overrides = tiny_overrides(features, lm_dir, out_dir, "train.ep_size=1")
    result = run_train_main(["--config", str(TINY_CONFIG), "--evaluate-export", str(export_dir), *overrides], timeout_s=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out_dir / "eval.json").read_text())


def test_mid_run_checkpoint_reloads_in_one_rank_with_the_live_held_out_loss(world, full_run, mid_run, tmp_path):
    out = tmp_path / "offline_step6"
    export_main(["--checkpoint", str(full_run / "checkpoints" / f"step_{MID_STEP:08d}"), "--out", str(out)])
    assert json.loads((out / "export.json").read_text())["step"] == MID_STEP
    # The two runs took the same 6 steps, so the stopped run's live model is the model at step 6.
    assert_same_tensors(load_tensors(out / EXPORT_WEIGHTS), load_tensors(mid_run / "export" / EXPORT_WEIGHTS))
    reloaded = evaluate_in_one_rank(world, out, tmp_path / "eval_one_rank")
    live = json.loads((mid_run / "eval.json").read_text())  # evaluated by the 2-rank engine at step 6
    print(f"held-out caption loss at step {MID_STEP}: live 2 ranks {live['caption_loss']:.6f}, "
          f"offline export in 1 rank {reloaded['caption_loss']:.6f}")
    assert reloaded["samples"] == live["samples"]
    # Rel 1e-5, not exact: one rank sums the held-out losses in another order than two ranks do.
    assert reloaded["caption_loss"] == pytest.approx(live["caption_loss"], rel=1e-5)
    assert reloaded["lm_without_image_loss"] == pytest.approx(live["lm_without_image_loss"], rel=1e-6)
    assert [e["generated"] for e in reloaded["examples"]] == [e["generated"] for e in live["examples"]]


def test_deepspeed_script_is_replaced_by_a_note_naming_our_command(full_run, tmp_path):
    checkpoints = shutil.copytree(full_run / "checkpoints", tmp_path / "checkpoints")
    # The training loop swapped DeepSpeed's script for the note after every save.
    assert not (checkpoints / "zero_to_fp32.py").exists() and (checkpoints / HOW_TO_EXPORT).is_file()
    # As DeepSpeed leaves it, with its script copied in on save:
    (checkpoints / HOW_TO_EXPORT).unlink()
    (checkpoints / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script\n")
    note = replace_deepspeed_consolidation_script(checkpoints)
    assert not (checkpoints / "zero_to_fp32.py").exists() and not (checkpoints / "zero_to_torch.py").exists()
    assert note == checkpoints / HOW_TO_EXPORT
    assert f"python -m launcher.export --checkpoint {checkpoints.resolve()} --out" in note.read_text()
    # The folder still consolidates after the swap (the note is not taken for a checkpoint).
    assert consolidate_checkpoint(checkpoints).step == FINAL_STEP


def damage_step_folder(checkpoints: Path, damage: str) -> Path:
    step = checkpoints / f"step_{FINAL_STEP:08d}"
    if damage == "no_manifest":
        (step / "manifest.json").unlink()
    elif damage == "truncated_expert":
        expert = step / "layer_0_expert_3_mp_rank_00_model_states.pt"
        expert.write_bytes(expert.read_bytes()[:100])
    elif damage == "missing_optimizer_shard":
        (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return step


@pytest.mark.parametrize("damage, expected", [
    ("no_manifest", "no manifest (unfinished write)"),
    ("truncated_expert", "layer_0_expert_3_mp_rank_00_model_states.pt does not match its manifest (damaged)"),
    ("missing_optimizer_shard", "missing zero_pp_rank_1_mp_rank_00_optim_states.pt"),
])
def test_partial_or_damaged_step_folder_is_refused_with_one_line_and_exit_2(full_run, tmp_path, capsys, damage, expected):
    checkpoints = shutil.copytree(full_run / "checkpoints", tmp_path / "checkpoints")
    step = damage_step_folder(checkpoints, damage)
    with pytest.raises(SystemExit) as exited:
        export_main(["--checkpoint", str(step), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error, error
    assert not (tmp_path / "out").exists()
    # Given the checkpoints folder, the damaged newest step is skipped for the previous one, as a resume does.
    assert consolidate_checkpoint(checkpoints).step == MID_STEP


def test_cli_refuses_a_folder_without_usable_checkpoints_with_exit_2(full_run, tmp_path):
    checkpoints = shutil.copytree(full_run / "checkpoints", tmp_path / "checkpoints")
    for step in (MID_STEP, FINAL_STEP):
        (checkpoints / f"step_{step:08d}" / "manifest.json").unlink()
    result = subprocess.run([sys.executable, "-m", "launcher.export", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no usable checkpoint in") and len(result.stderr.strip().splitlines()) == 1, result.stderr
