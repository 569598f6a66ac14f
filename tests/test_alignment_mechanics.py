"""The alignment objective's mechanics, each with a known answer: geodesic similarities on the cosine's
scale, an ITC temperature that cannot stick at a bound (also under DeepSpeed ZeRO's fp32 master copy),
and the momentum model's EMA update (p_m <- m p_m + (1 - m) p, once per applied optimizer step)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from common_fixtures import free_port

from vlpdist.config import AlignConfig, Config, TrainConfig
from vlpdist.models.captioner import AlignmentHeads


def tiny_objective(tiny_lm, **align):
    """A real objective (tiny captioner, momentum 0, one process, a 64-slot bank of 8-D entries, exact geodesics
    over a k=4 graph) with `align` over those settings."""
    from vlpdist.losses.distributed import DataParallelContext
    from vlpdist.models.captioner import build_captioner
    from vlpdist.train.alignment import AlignmentObjective

    config = Config()
    config.model = dataclasses.replace(config.model, lm_name=str(tiny_lm), mapper="mlp", prefix_length=2)
    config.train = dataclasses.replace(config.train, micro_batch_size=4)
    defaults = dict(itc_weight=1.0, supcon_weight=1.0, embed_dim=8, bank_size=64, momentum=0.0, geodesic_k=4,
                    geodesic_method="exact", geodesic_refresh_every=4, false_negatives="none")
    config.align = dataclasses.replace(config.align, **(defaults | align))
    return AlignmentObjective(config, build_captioner(config.model, 16, align=config.align), DataParallelContext(), num_labels=3)


def circle_bank_objective(tiny_lm, metric: str = "geodesic"):
    """A real objective whose 64-slot bank lies on an arc in 8-D."""
    objective = tiny_objective(tiny_lm, negatives="cosine", metric=metric)
    generator = torch.Generator().manual_seed(0)
    angle = torch.linspace(0, 3.0, 64)
    points = torch.zeros(64, 8)
    points[:, 0], points[:, 1] = torch.cos(angle), torch.sin(angle)
    points = torch.nn.functional.normalize(points + 0.01 * torch.randn(64, 8, generator=generator), dim=1)
    objective.bank.enqueue_gathered(points, points, torch.zeros(64, 3), torch.arange(1000, 1064), step=0)
    objective.refresh_geodesics(step=4)
    return objective, angle


def test_one_hop_geodesic_similarity_equals_the_cosine(tiny_lm):
    """A bank entry the anchor reaches in one hop (its nearest node) scores exactly its cosine, 1 - d^2/2 with
    d the chord; a far entry scores below its cosine (the path is longer than the chord)."""
    from vlpdist.losses.contrastive import ContrastiveKeys, build_keys

    objective, angle = circle_bank_objective(tiny_lm)
    # Anchors between the bank's points (new samples), on the arc.
    between = (angle[[10, 25, 40, 55]] + angle[[11, 26, 41, 56]]) / 2
    anchors = torch.zeros(4, 8)
    anchors[:, 0], anchors[:, 1] = torch.cos(between), torch.sin(between)
    view = objective.bank.view()
    bank = ContrastiveKeys(view["visual"], view["text"], view["sample_ids"], view["labels"], view["valid"])
    keys, own_index_b = build_keys(anchors, anchors, torch.arange(3000, 3004), torch.zeros(4, 3), objective.ctx, bank)
    _, similarity_bK = objective.geodesic_masks(anchors, keys, 4, own_index_b)
    bank_similarity_bN = similarity_bK[:, 4:]
    cosine_bN = anchors @ keys.visual_KD[4:].T
    nearest_b = cosine_bN.argmax(dim=1)
    rows = torch.arange(4)
    torch.testing.assert_close(bank_similarity_bN[rows, nearest_b], cosine_bN[rows, nearest_b], rtol=0, atol=1e-5)
    # The old scale, 1 - d, would be 1 - sqrt(2 (1 - cos)): far from the cosine at these distances.
    chord_b = (2 * (1 - cosine_bN[rows, nearest_b])).sqrt()
    assert ((1 - chord_b) - cosine_bN[rows, nearest_b]).abs().min() > 1e-3
    # The farthest entry along the arc: its path is longer than its chord, so it scores below the cosine.
    farthest_b = cosine_bN.argmin(dim=1)
    assert (bank_similarity_bN[rows, farthest_b] < cosine_bN[rows, farthest_b] - 1e-3).all()


def pushed_then_pulled(heads: AlignmentHeads, step, push_steps: int = 15, pull_steps: int = 40) -> tuple[list, list]:
    """Push the temperature up (loss -T) past its upper bound, then pull it down (loss +T); `step(loss)` runs one
    optimizer step and the in-place clamp. Returns the temperatures after each step of both phases."""
    pushed, pulled = [], []
    for sign, steps, trace in ((-1.0, push_steps, pushed), (1.0, pull_steps, pulled)):
        for _ in range(steps):
            step(sign * heads.temperature())
            trace.append(float(heads.log_temperature.detach().exp()))
    return pushed, pulled


def test_temperature_pushed_past_a_bound_comes_back_when_the_loss_favours_it():
    align = AlignConfig(itc_weight=1.0, temperature_init=0.4, temperature_min=0.01, temperature_max=0.5)
    heads = AlignmentHeads(8, 8, align)
    optimizer = torch.optim.AdamW([heads.log_temperature], lr=0.05, weight_decay=0.0)

    def step(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        heads.clamp_temperature_()

    pushed, pulled = pushed_then_pulled(heads, step)
    assert max(pushed) <= 0.5 * (1 + 1e-6) and pushed[-1] == pytest.approx(0.5, rel=1e-6)  # at the bound, not past it
    # Back inside: a clamp in the forward (no gradient past the bound) would leave it at 0.5 for good.
    assert pulled[-1] < 0.3


def zero_temperature_rank(rank: int, port: int, results: dict, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from deepspeed.utils import safe_get_full_fp32_param

    from vlpdist.parallel.engine import DistInfo, build_engine, init_distributed

    init_distributed(120)  # not deepspeed.init_distributed: ours skips the CPU shm op's minute-long JIT build
    heads = AlignmentHeads(8, 8, AlignConfig(itc_weight=1.0, temperature_init=0.4, temperature_min=0.01, temperature_max=0.5))
    train = TrainConfig(micro_batch_size=1, lr=0.05, warmup_steps=1, max_steps=100, zero_stage=2, weight_decay=0.0)
    engine, _ = build_engine(heads, train, DistInfo(rank, 1, rank, False), Path(run_dir))
    masters = []

    def step(loss):
        engine.backward(loss)
        engine.step()
        engine.module.clamp_temperature_()
        masters.append(float(safe_get_full_fp32_param(engine.module.log_temperature).exp()))

    pushed, pulled = pushed_then_pulled(engine.module, step)
    results.update(pushed=pushed, pulled=pulled, masters=masters)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_temperature_clamp_reaches_deepspeeds_fp32_master_copy(tmp_path):
    """Under ZeRO-2 the optimizer steps an fp32 master copy and writes it back over the parameter: clamping the
    parameter alone would be undone at the next step. The master itself stays within the bound."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(zero_temperature_rank, args=(free_port(), results, str(tmp_path)), nprocs=1, join=True)
        results = dict(results)
    push_steps = len(results["pushed"])
    assert max(results["masters"][:push_steps]) <= 0.5 * (1 + 1e-6)
    assert max(results["pushed"]) <= 0.5 * (1 + 1e-6) and results["pulled"][-1] < 0.3


def small_mapper_captioner(tiny_lm):
    from vlpdist.models.captioner import build_captioner

    config = Config()
    config.model = dataclasses.replace(config.model, lm_name=str(tiny_lm), mapper="mlp", prefix_length=2)
    config.align = dataclasses.replace(config.align, itc_weight=1.0, embed_dim=8)
    return build_captioner(config.model, 16, align=config.align)


def test_momentum_update_is_the_ema_with_the_momentum_on_the_old_weights(tiny_lm):
    """p_m <- m p_m + (1 - m) p, by hand, after online weights moved: fails if m and 1 - m are swapped or the
    update is skipped; and the count of updates is kept and saved."""
    from vlpdist.train.momentum import MomentumEncoder

    captioner = small_mapper_captioner(tiny_lm)
    momentum = MomentumEncoder(captioner, 0.9)
    before = {name: param.detach().clone() for name, param in momentum.mapper.named_parameters()}
    # The copy starts equal to the online model.
    for name, param in captioner.mapper.named_parameters():
        assert torch.equal(param.detach().float(), before[name])
    with torch.no_grad():
        for param in captioner.mapper.parameters():
            param.add_(1.0)
    momentum.update(captioner)
    for name, param in momentum.mapper.named_parameters():
        online = dict(captioner.mapper.named_parameters())[name].detach().float()
        torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * online, rtol=1e-6, atol=1e-6)
    assert momentum.updates == 1
    restored = MomentumEncoder(captioner, 0.9)
    restored.load_state_tensors(momentum.state_tensors())
    assert restored.updates == 1
    for name, param in restored.mapper.named_parameters():
        assert torch.equal(param, dict(momentum.mapper.named_parameters())[name])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_momentum_experts_start_as_their_ranks_online_experts_and_move_once_per_applied_step(tiny_lm, tmp_path):
    """2 ranks, ep_size 2, lr 0 (the online weights never move, so an EMA that started equal stays equal, bit for
    bit): each rank's momentum experts equal that rank's online experts (another rank's would differ), and the
    momentum model took exactly one update per applied optimizer step, none for the NaN-skipped ones."""
    import json

    from safetensors.torch import load_file
    from train_fixtures import launch, tiny_features, tiny_overrides

    from vlpdist.parallel.expert_state import global_to_local_expert_state

    # One training sample in 24 has a NaN embedding: about half the 16-sample steps are skipped.
    nan_keys = frozenset(f"{shard:05d}{index:04d}" for shard in range(5) for index in range(0, 48, 24))
    features = tiny_features(tmp_path / "features", nan_keys=nan_keys)
    run_dir = tmp_path / "run"
    result = launch(tiny_overrides(
        features, tiny_lm, run_dir, "train.lr=0.0", "train.max_steps=6", "train.checkpoint_every=6", "train.log_every=1",
        "train.max_consecutive_nan_steps=40", "train.eval_at_end=false", "train.export_at_end=false",
        "train.caption_log_every=0", "align.itc_weight=0.2", "align.bank_size=64", "align.momentum=0.9"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and metrics[-1]["nan_skipped"] > 0
    folder = run_dir / "checkpoints" / "step_00000006"
    online = {}
    for path in sorted(folder.glob("layer_*_expert_*_model_states.pt")):
        online.update(torch.load(path, map_location="cpu", weights_only=True))
    assert online, sorted(p.name for p in folder.iterdir())
    for rank in range(2):
        momentum = load_file(str(folder / f"extra_momentum_model_rank{rank:05d}.safetensors"))
        assert int(momentum["updates"]) == 6
        local = global_to_local_expert_state(online, rank, experts_per_rank=2)
        expert_keys = [key for key in momentum if "deepspeed_experts" in key]
        assert expert_keys
        for key in expert_keys:
            online_key = next(k for k in local if k.endswith(key.removeprefix("mapper.")) and "deepspeed_experts" in k)
            assert torch.equal(momentum[key], local[online_key].float()), key


def test_geodesic_hard_negatives_are_the_other_arm_where_cosine_mining_picks_the_anchors_own(tiny_lm):
    """Two parallel arcs (arms of two classes) 0.3 apart, their points 0.05 apart along each: the k-NN graph
    follows each arm, so an anchor's own arm is near along the manifold (stretch ~1) and the other arm is far
    (another component). Known answer: the H hard negatives are the other arm's entries, the highest-stretch
    eligible slots among the cosine-nearest pool, while the H cosine-nearest entries are the anchor's own arm
    (false negatives for a class)."""
    from vlpdist.losses.contrastive import ContrastiveKeys, build_keys

    objective = tiny_objective(tiny_lm, negatives="geodesic_hard", hard_negative_pool=16, hard_negatives=4)

    def arm(angle, offset):
        points = torch.zeros(angle.shape[0], 8)
        points[:, 0], points[:, 1], points[:, 2] = torch.cos(angle), torch.sin(angle), offset
        return torch.nn.functional.normalize(points, dim=1)

    angle = torch.arange(32) * 0.05
    bank_points = torch.cat([arm(angle, 0.0), arm(angle + 0.025, 0.3)])  # slots 0..31 arm A, 32..63 arm B
    objective.bank.enqueue_gathered(bank_points, bank_points, torch.zeros(64, 3), torch.arange(1000, 1064), step=0)
    objective.refresh_geodesics(step=4)
    assert objective.snapshot.stats["connected_components"] == 2
    anchors = arm(torch.tensor([0.4125, 0.6125, 0.8125, 1.0125]), 0.0)  # on arm A, between its points
    view = objective.bank.view()
    bank = ContrastiveKeys(view["visual"], view["text"], view["sample_ids"], view["labels"], view["valid"])
    keys, own_index_b = build_keys(anchors, anchors, torch.arange(3000, 3004), torch.zeros(4, 3), objective.ctx, bank)
    keep_bK, _ = objective.geodesic_masks(anchors, keys, 4, own_index_b)
    chosen_bN = keep_bK[:, 4:]
    assert (chosen_bN.sum(dim=1) == 4).all()
    assert chosen_bN[:, 32:].sum(dim=1).tolist() == [4, 4, 4, 4]  # every pick on the other arm
    cosine_nearest_bH = (anchors @ bank_points.T).topk(4, dim=1).indices
    assert (cosine_nearest_bH < 32).all()  # cosine mining would pick the anchor's own arm
