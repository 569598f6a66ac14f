"""Alignment in real DeepSpeed training on 2 CPU ranks (gloo): ITC + SupCon over a memory bank
kept by a momentum mapper whose experts are spread like the online ones (ep_size 2), with geodesic
hard negatives and false-negative removal; bank, momentum model and geodesic snapshot in the
checkpoint; resume bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import launch, read_metrics, seed_checkpoints, tiny_features, tiny_overrides

from vlpdist.train.text_cache import TextFeatureCache

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Bank of 64 = 4 steps of 2 ranks x 8: it wraps around in a 12-step run; the graph is rebuilt at
# steps 4 and 8 and 12, so the checkpoint at step 6 holds a snapshot taken two steps before. Path lengths
# between this bank's entries run from 0.23 (1st percentile) over 0.34 (5th) to 1.17 (median): a radius
# of 0.35 removes a few entries per anchor, and the test asserts that it does.
ALIGNED = [
    "align.itc_weight=0.2", "align.supcon_weight=0.2", "align.bank_size=64", "align.momentum=0.9",
    "align.distill_alpha=0.4", "align.negatives=geodesic_hard", "align.false_negatives=geodesic",
    "align.geodesic_refresh_every=4", "align.geodesic_k=4", "align.hard_negatives=8", "align.hard_negative_pool=32",
    "align.false_negative_radius=0.35", "train.zero_stage=2", "train.ep_size=2",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_lm):
    return tiny_features(tmp_path_factory.mktemp("align") / "features"), tiny_lm


@pytest.fixture(scope="module")
def aligned_run(world, tmp_path_factory):
    features, lm_dir = world
    run_dir = tmp_path_factory.mktemp("aligned_run")
    result = launch(tiny_overrides(features, lm_dir, run_dir, *ALIGNED))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_alignment_terms_are_trained_and_logged(aligned_run):
    run_dir, _ = aligned_run
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:
        # The loop sums the weighted terms it is given and logs every one.
        assert m["loss"] == pytest.approx(m["cap"] + 0.01 * m["moe_aux"] + 0.2 * m["itc"] + 0.2 * m["supcon"], rel=1e-5)
        assert 0 < m["supcon_anchors"] <= 1 and 0.01 <= m["itc_temperature"] <= 0.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/itc", "loss/supcon", "align/bank_fill", "geodesic/connected_components", "geodesic/mean_degree",
            "geodesic/build_knn_s"} <= tags
    # After 12 steps of 16 distinct samples the 64-slot bank is full of distinct ids.
    assert accumulator.Scalars("align/bank_fill")[-1].value == 64
    # The false-negative radius acted: some bank entries within it along the graph were dropped as negatives.
    assert accumulator.Scalars("geodesic/false_negatives_removed")[-1].value > 0


def test_geodesic_trust_reaches_tensorboard_the_summary_line_and_eval_json(aligned_run):
    """Issue 17 item 4: each refresh's trust statistics are logged, and the end of training says, in one line
    and in eval.json, how many of its refreshes were flagged."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result = aligned_run
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    trust = {tag: [event.value for event in accumulator.Scalars(tag)] for tag in
             ("geodesic/intrinsic_dimension", "geodesic/short_range_stretch", "geodesic/rank_agreement", "geodesic/trusted")}
    # Refreshes at steps 4, 8 and 12, logged every 2 steps from step 4 on.
    assert all(len(values) >= 3 for values in trust.values()), {tag: len(values) for tag, values in trust.items()}
    assert set(trust["geodesic/trusted"]) <= {0.0, 1.0}
    assert all(0.0 < value < 64.0 for value in trust["geodesic/intrinsic_dimension"])
    assert all(value >= 1.0 for value in trust["geodesic/short_range_stretch"])  # a graph path is never shorter than the chord
    assert all(-1.0 <= value <= 1.0 for value in trust["geodesic/rank_agreement"])

    summary = json.loads((run_dir / "eval.json").read_text())["geodesics"]
    assert summary["refreshes"] == 3 and 0 <= summary["untrusted_refreshes"] <= 3
    # The last refresh (step 12) is what the last logged scalars (step 12) show.
    assert summary["last_intrinsic_dimension"] == pytest.approx(trust["geodesic/intrinsic_dimension"][-1], rel=1e-6)
    assert summary["last_short_range_stretch"] == pytest.approx(trust["geodesic/short_range_stretch"][-1], rel=1e-6)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("geodesics: ")]
    if summary["untrusted_refreshes"]:
        assert re.match(rf"geodesics: {summary['untrusted_refreshes']} of 3 graph refreshes could not follow the bank", line)
    else:
        assert line.startswith("geodesics: all 3 graph refreshes followed the bank "
                               f"(last: short-range stretch {summary['last_short_range_stretch']:.2f}")
    flagged_steps = [int(m) for m in re.findall(r"warning: geodesic graph at step (\d+)", result.stdout)]
    assert len(flagged_steps) == summary["untrusted_refreshes"]


def test_checkpoint_holds_bank_momentum_and_snapshot_as_safetensors(aligned_run):
    from safetensors.torch import load_file

    run_dir, _ = aligned_run
    folder = run_dir / "checkpoints" / "step_00000006"
    manifest = json.loads((folder / "manifest.json").read_text())
    extras = sorted(name for name in manifest["files"] if name.startswith("extra_"))
    # The bank once (identical on every rank), the momentum model once per expert-parallel rank.
    assert extras == ["extra_alignment_bank_rank00000.safetensors", "extra_momentum_model_rank00000.safetensors",
                      "extra_momentum_model_rank00001.safetensors"]
    bank = load_file(str(folder / extras[0]))
    assert int(bank["snapshot.step"]) == 4 and bank["bank.valid"].sum() == 64
    ids = bank["bank.sample_ids"][bank["bank.valid"]]
    assert ids.unique().numel() == ids.numel()
    experts = [load_file(str(folder / name)) for name in extras[1:]]
    # Each rank's momentum copy holds its own experts (local ids 0..1 = global 2r..2r+1): they differ.
    expert_keys = [key for key in experts[0] if "deepspeed_experts" in key]
    assert expert_keys and any(not torch.equal(experts[0][key], experts[1][key]) for key in expert_keys)
    assert not (run_dir / "checkpoints" / "zero_to_fp32.py").exists()
    assert (run_dir / "checkpoints" / "HOW_TO_EXPORT.txt").is_file()


def test_resume_with_bank_momentum_and_geodesics_is_bit_exact(aligned_run, world, tmp_path):
    straight_dir, _ = aligned_run
    features, lm_dir = world
    seed_checkpoints(straight_dir, tmp_path, ["step_00000006"], latest="step_00000006")
    result = launch(tiny_overrides(features, lm_dir, tmp_path, *ALIGNED, "train.eval_at_end=false", "train.export_at_end=false"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from step 6" in result.stdout
    resumed, straight = read_metrics(tmp_path), read_metrics(straight_dir)[6:]
    assert [m["step"] for m in resumed] == list(range(7, 13))
    for name in ("loss", "cap", "itc", "supcon", "supcon_anchors", "itc_temperature", "grad_norm"):
        assert [m[name] for m in resumed] == [m[name] for m in straight], name


def test_resume_without_the_alignment_state_is_refused(aligned_run, world, tmp_path):
    """A checkpoint made without alignment cannot seed an aligned run: its bank and momentum state are missing."""
    features, lm_dir = world
    plain = tmp_path / "plain"
    result = launch(tiny_overrides(features, lm_dir, plain, "train.max_steps=2", "train.checkpoint_every=2",
                                   "train.eval_at_end=false", "train.export_at_end=false", "train.ep_size=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = launch(tiny_overrides(features, lm_dir, plain, *ALIGNED, "train.max_steps=4", "train.eval_at_end=false",
                                   "train.export_at_end=false"))
    assert result.returncode == 2
    assert "has no alignment_bank state" in result.stderr + result.stdout


def test_text_feature_cache_computes_each_caption_once():
    cache = TextFeatureCache(capacity=5, width=3, device=torch.device("cpu"))
    ids, captions = torch.tensor([10, 11, 12]), torch.tensor([0, 1, 0])
    assert cache.rows(ids, captions) is None
    features = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    cache.store(ids, captions, features)
    rows = cache.rows(ids, captions)
    assert torch.equal(cache.lookup(rows), features)
    # Another caption of sample 10 is another entry; over capacity, rows are not cached (computed each time).
    more = torch.tensor([10, 13, 14]), torch.tensor([1, 0, 0])
    cache.store(*more, features + 100)
    assert cache.rows(*more) is None and len(cache.row_of) == 5
    assert torch.equal(cache.lookup(cache.rows(torch.tensor([10, 13]), torch.tensor([1, 0]))), features[:2] + 100)


def test_multi_hot_labels_and_runs_without_labels():
    from vlpdist.train.alignment import multi_hot

    label_ids = torch.tensor([[0, 3], [2, -1], [-1, -1]])
    assert multi_hot(label_ids, 4, torch.device("cpu")).tolist() == [[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    # ITC without SupCon reads no labels: samples' ids are not checked against an absent vocabulary.
    assert multi_hot(label_ids, 0, torch.device("cpu")).shape == (3, 0)
    # An id outside the vocabulary is dropped like padding (raising on one rank would hang the others).
    assert multi_hot(label_ids, 3, torch.device("cpu")).tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_geodesic_settings_that_cannot_work_are_refused():
    from vlpdist.config import AlignConfig
    from vlpdist.errors import UserError
    from vlpdist.train.alignment import check_geodesic_settings

    align = AlignConfig(bank_size=65536, geodesic_refresh_every=50, negatives="geodesic_hard")
    check_geodesic_settings(align, rows_per_step=1024)  # turns over every 64 steps
    with pytest.raises(UserError, match="turns over every 8 steps"):
        check_geodesic_settings(align, rows_per_step=128 * 64)  # 128 ranks x 64
    with pytest.raises(UserError, match="faiss_hnsw"):
        check_geodesic_settings(AlignConfig(geodesic_backend="faiss_hnsw", negatives="geodesic_hard"), rows_per_step=32)


def test_geodesic_masks_pick_only_described_bank_slots(tiny_lm):
    """On a real objective (a tiny captioner, momentum 0, one process): hard negatives come only from
    bank slots the graph describes, never a rewritten, invalid or own-sample slot; false negatives are
    removed only within the radius; in-batch keys are always kept; SupCon's similarity is finite."""
    import dataclasses

    from vlpdist.config import Config
    from vlpdist.losses.contrastive import ContrastiveKeys, build_keys
    from vlpdist.losses.distributed import DataParallelContext
    from vlpdist.models.captioner import build_captioner
    from vlpdist.train.alignment import AlignmentObjective

    config = Config()
    config.model = dataclasses.replace(config.model, lm_name=str(tiny_lm), mapper="mlp", prefix_length=2)
    config.train = dataclasses.replace(config.train, micro_batch_size=4)
    config.align = dataclasses.replace(
        config.align, itc_weight=1.0, supcon_weight=1.0, embed_dim=8, bank_size=64, momentum=0.0, geodesic_k=4,
        geodesic_method="exact", geodesic_refresh_every=4, negatives="geodesic_hard", false_negatives="geodesic",
        hard_negative_pool=24, hard_negatives=6, false_negative_radius=0.2, metric="geodesic")
    captioner = build_captioner(config.model, 16, align=config.align)
    objective = AlignmentObjective(config, captioner, DataParallelContext(), num_labels=3)
    generator = torch.Generator().manual_seed(0)
    # A smooth 1-D manifold (a circle arc in 8-D) so the graph is connected and geodesics differ from cosine.
    angle = torch.linspace(0, 3.0, 64)
    points = torch.zeros(64, 8)
    points[:, 0], points[:, 1] = torch.cos(angle), torch.sin(angle)
    points = torch.nn.functional.normalize(points + 0.01 * torch.randn(64, 8, generator=generator), dim=1)
    ids = torch.arange(1000, 1064)
    objective.bank.enqueue_gathered(points, points, torch.zeros(64, 3), ids, step=0)
    objective.refresh_geodesics(step=4)
    assert objective.snapshot is not None and objective.snapshot.stats["connected_components"] == 1
    # After the refresh: 4 slots rewritten with new samples, one slot invalidated by a re-enqueued id.
    objective.bank.enqueue_gathered(points[:4], points[:4], torch.zeros(4, 3), torch.arange(2000, 2004), step=5)
    objective.bank.enqueue_gathered(points[10:11], points[10:11], torch.zeros(1, 3), torch.tensor([1010]), step=5)
    # ... so slot 10 is invalid (its id moved to slot 4) and slots 0..4 hold entries the graph never saw.
    anchors = points[[20, 30, 40, 50]]
    view = objective.bank.view()
    bank = ContrastiveKeys(view["visual"], view["text"], view["sample_ids"], view["labels"], view["valid"])
    anchor_ids = torch.tensor([1030, 3001, 3002, 3003])  # anchor 0 is sample 1030 again: its bank copy is its own
    keys, own_index_b = build_keys(anchors, anchors, anchor_ids, torch.zeros(4, 3), objective.ctx, bank)
    keep_bK, similarity_bK = objective.geodesic_masks(anchors, keys, 4, own_index_b)
    assert keep_bK[:, :4].all()  # in-batch keys
    bank_keep_bN = keep_bK[:, 4:]
    assert not bank_keep_bN[:, :5].any() and not bank_keep_bN[:, 10].any()  # rewritten and invalid slots
    assert not bank_keep_bN[0, 30]  # anchor 0's own older copy
    assert (bank_keep_bN.sum(dim=1) <= 6).all() and (bank_keep_bN.sum(dim=1) > 0).all()
    # No kept hard negative lies within the false-negative radius along the manifold.
    geodesic_bn, reachable_bn = objective.snapshot.distances(anchors)
    slots = objective.snapshot_slots_n
    near_bn = reachable_bn & (geodesic_bn < 0.2)
    assert not (bank_keep_bN[:, slots] & near_bn).any() and near_bn.any()
    assert similarity_bK.shape == keep_bK.shape and torch.isfinite(similarity_bK).all()
