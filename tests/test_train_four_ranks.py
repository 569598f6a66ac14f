"""4 CPU ranks at ep_size 2 — the layout of every real cluster, where the expert-parallel group
(2 ranks holding different experts) and the expert-data-parallel group (2 ranks holding the same
experts) are both larger than one: exact mid-epoch resume, and the consolidated export reloaded
in one rank at ep_size 1 with the same held-out loss. (Weight parity with one rank after two
steps is in test_train_ep_parity.py.)"""

from __future__ import annotations

import shutil

import pytest
from train_fixtures import evaluate_export_in_one_rank, launch, read_metrics, tiny_features, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = ("train.max_steps=6", "train.checkpoint_every=3", "train.log_every=3", "train.caption_log_every=0")


@pytest.fixture(scope="module")
def four_rank_run(tiny_lm, tmp_path_factory):
    features = tiny_features(tmp_path_factory.mktemp("four_ranks") / "features")
    run_dir = tmp_path_factory.mktemp("four_rank_run")
    result = launch(tiny_overrides(features, tiny_lm, run_dir, "train.ep_size=2", *STEPS), num_procs=4, timeout_s=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return features, run_dir, result


def test_four_ranks_at_ep2_resume_mid_epoch_bit_exact(four_rank_run, tiny_lm, tmp_path):
    features, straight_dir, straight = four_rank_run
    # 240 training samples over 4 slots: 7 micro-batches of 8 per slot and epoch, 16 samples left out.
    assert "240 training samples in 5 shards over 4 ranks x 1 loader workers: 7 micro-batches of 8" in straight.stdout
    assert "16 samples (6.67 %) left out per epoch" in straight.stdout
    checkpoint = straight_dir / "checkpoints" / "step_00000003"
    # Experts by global id, one file each; ZeRO optimizer partitions of both the dense and the expert groups.
    assert len(list(checkpoint.glob("layer_0_expert_*_model_states.pt"))) == 4
    shutil.copytree(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    (tmp_path / "checkpoints" / "latest").write_text(checkpoint.name)
    resumed = launch(tiny_overrides(features, tiny_lm, tmp_path, "train.ep_size=2", "train.eval_at_end=false",
                                    "train.export_at_end=false", *STEPS), num_procs=4, timeout_s=800)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout
    after, before = read_metrics(tmp_path), read_metrics(straight_dir)[3:]
    assert [m["step"] for m in after] == [4, 5, 6]
    assert [m["loss"] for m in after] == [m["loss"] for m in before]
    assert [m["grad_norm"] for m in after] == [m["grad_norm"] for m in before]


def test_four_rank_export_reloads_in_one_rank_at_ep1_with_the_same_heldout_loss(four_rank_run, tiny_lm, tmp_path):
    features, straight_dir, _ = four_rank_run
    reloaded, original = evaluate_export_in_one_rank(features, tiny_lm, straight_dir / "export", tmp_path)
    # Held-out samples were shared over the 4 ranks there and all in one rank here.
    assert reloaded["samples"] == original["samples"] == 48
    assert reloaded["caption_loss"] == pytest.approx(original["caption_loss"], rel=1e-5)
    assert [e["generated"] for e in reloaded["examples"]] == [e["generated"] for e in original["examples"]]
