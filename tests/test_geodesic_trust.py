"""Geodesics measured where they act, and geodesics that say when they can be trusted (issue 17 items 3, 4).

- On two interleaved spiral arms (two classes, joined only at the centre), landmark distances are exact
  in the range where the false-negative radius, the limit and the hard picks act (the landmark bound
  alone is not), and geodesic hard negatives pick the other arm far more often than cosine mining.
- The trust statistics flag points uniform on the 15-sphere (N = 3,000, k = 10) and not an S-curve in 128-D.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("scipy")

from vlpdist.geodesic import GeodesicSnapshot  # noqa: E402
from vlpdist.geodesic.trust import SHORT_RANGE_STRETCH_MAX  # noqa: E402

SCALE = 0.05  # the spiral plane's units -> chords on the sphere's cap
ARM_POINTS = 512
GAP = 0.5  # between neighbouring turns of the two arms (pitch 1 per turn, arms half a turn apart)


def on_cap(points_N2: np.ndarray, dim: int, seed: int) -> torch.Tensor:
    """normalize(e_0 + SCALE * W p), W (dim - 1, 2) orthonormal: the plane on a small, nearly flat cap of the unit sphere."""
    basis_D2 = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim - 1, 2)))[0]
    lifted_ND = np.zeros((points_N2.shape[0], dim))
    lifted_ND[:, 0] = 1.0
    lifted_ND[:, 1:] = SCALE * points_N2 @ basis_D2.T
    return torch.tensor(lifted_ND / np.linalg.norm(lifted_ND, axis=1, keepdims=True), dtype=torch.float32)


def spiral_arm(arc_S: np.ndarray, phase: float) -> np.ndarray:
    """Points at arc lengths arc_S on the spiral r = theta / (2 pi) (pitch 1), rotated by `phase`."""
    theta_S = np.sqrt(4.0 * np.pi * arc_S)  # arc length of r = b theta is about b theta^2 / 2, b = 1 / (2 pi)
    radius_S = theta_S / (2.0 * np.pi)
    return np.stack([radius_S * np.cos(theta_S + phase), radius_S * np.sin(theta_S + phase)], axis=1)


@pytest.fixture(scope="module")
def spiral_bank():
    """(bank_ND, class_N, anchors_BD): 2 x 512 entries 0.098 apart along their arm, arms 0.5 apart (x SCALE);
    16 anchors on arm 0 between its entries, past its second turn (where both arms' turns neighbour it)."""
    arc_S = np.linspace(0.0, 16.0 * np.pi, ARM_POINTS)
    step = arc_S[1] - arc_S[0]
    points_N2 = np.concatenate([spiral_arm(arc_S, 0.0), spiral_arm(arc_S, np.pi)])
    class_N = np.repeat([0, 1], ARM_POINTS)
    anchor_arc_B = arc_S[200:456:16] + step / 2
    bank_ND = on_cap(np.concatenate([points_N2, spiral_arm(anchor_arc_B, 0.0)]), 8, seed=0)
    return bank_ND[: 2 * ARM_POINTS], torch.from_numpy(class_N), bank_ND[2 * ARM_POINTS :]


def test_landmark_distances_are_exact_inside_the_limit_where_the_bound_alone_is_not(spiral_bank):
    bank_ND, _, anchors_BD = spiral_bank
    limit = 2.0 * GAP * SCALE  # the hard-negative pool's reach on this bank (see the test below)
    ids_N = torch.arange(bank_ND.shape[0])
    snapshot = GeodesicSnapshot.build(bank_ND, ids_N, k=4, method="landmarks", num_landmarks=16, limit=limit)
    bound_only = GeodesicSnapshot.build(bank_ND, ids_N, k=4, method="landmarks", num_landmarks=16, limit=limit, local_nodes=0)
    assert snapshot.stats["connected_components"] == 1 and snapshot.stats["ball_capped_fraction"] == 0.0
    snapshot.limit = float("inf")
    exact_BN, _ = snapshot.distances(anchors_BD, method="exact")
    snapshot.limit = limit
    estimate_BN, reachable_BN = snapshot.distances(anchors_BD)
    bound_only.limit = float("inf")
    bound_BN, _ = bound_only.distances(anchors_BD)
    within_BN = exact_BN <= limit
    short_BN = exact_BN <= 0.3 * limit  # the small-distance range (a few hops), not all pairs
    assert short_BN.sum() >= 5 * anchors_BD.shape[0]
    torch.testing.assert_close(estimate_BN[short_BN], exact_BN[short_BN], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reachable_BN, within_BN, rtol=0, atol=0)
    torch.testing.assert_close(estimate_BN[within_BN], exact_BN[within_BN], rtol=1e-5, atol=1e-6)
    # The bound alone (the method before the balls) detours through landmarks: measured 1.7x at the
    # median inside the limit here; its short range is exact only on the anchor's k direct neighbours.
    stretch_within = (bound_BN[within_BN] / exact_BN[within_BN]).median()
    assert stretch_within > 1.3
    assert (bound_BN >= exact_BN - 1e-6).all()


def test_geodesic_hard_negatives_pick_the_other_arm_far_more_often_than_cosine_mining(tiny_lm, spiral_bank):
    """Expected rates from the geometry: with entries `step` = 0.098 apart along an arm and the other arm's
    turns GAP = 0.5 away on either side, the entries within chord r of an anchor are 2r / step of its own
    arm and 4 sqrt(r^2 - GAP^2) / step of the other. The 64-entry pool reaches r ~ 2 GAP (about 20 own,
    44 other), the 16 cosine-nearest r ~ 1.02 GAP (about 10 own and 6 other, rate ~0.3 with curvature).
    Geodesic mining picks the highest stretch: the other arm is reachable only through the centre, beyond
    the limit, so every pick is other-arm while the pool holds more than 16 of them (rate 1)."""
    from test_alignment_mechanics import tiny_objective

    from vlpdist.losses.contrastive import ContrastiveKeys, build_keys

    bank_ND, class_N, anchors_BD = spiral_bank
    pool, hard = 64, 16
    objective = tiny_objective(tiny_lm, negatives="geodesic_hard", hard_negative_pool=pool, hard_negatives=hard,
                               bank_size=bank_ND.shape[0], geodesic_method="landmarks", geodesic_limit=2.0 * GAP * SCALE)
    objective.bank.enqueue_gathered(bank_ND, bank_ND, torch.zeros(bank_ND.shape[0], 3), torch.arange(bank_ND.shape[0]), step=0)
    objective.refresh_geodesics(step=4)
    b = anchors_BD.shape[0]
    view = objective.bank.view()
    keys, own_index_b = build_keys(anchors_BD, anchors_BD, torch.arange(5000, 5000 + b), torch.zeros(b, 3), objective.ctx,
                                   ContrastiveKeys(view["visual"], view["text"], view["sample_ids"], view["labels"], view["valid"]))
    keep_bK, _ = objective.geodesic_masks(anchors_BD, keys, b, own_index_b)
    chosen_bN = keep_bK[:, b:]
    bank_class_N = class_N[objective.bank.sample_ids_N]  # slot -> its entry's arm
    assert (chosen_bN.sum(dim=1) == hard).all()
    geodesic_rate = float((chosen_bN & (bank_class_N[None, :] == 1)).sum() / (b * hard))
    cosine_top_bH = (anchors_BD @ objective.bank.visual_ND.T).topk(hard, dim=1).indices
    cosine_rate = float((bank_class_N[cosine_top_bH] == 1).float().mean())
    pool_other = float((bank_class_N[(anchors_BD @ objective.bank.visual_ND.T).topk(pool, dim=1).indices] == 1).float().sum(1).min())
    assert pool_other > hard  # the geometry above: geodesic mining's expected rate is 1
    assert geodesic_rate >= 0.95
    assert 0.1 <= cosine_rate <= 0.5  # the expected ~0.3, with margin
    assert geodesic_rate >= cosine_rate + 0.45


def sphere_points(num: int, dim: int, seed: int) -> torch.Tensor:
    x_ND = np.random.default_rng(seed).standard_normal((num, dim))
    return torch.tensor(x_ND / np.linalg.norm(x_ND, axis=1, keepdims=True), dtype=torch.float32)


def s_curve(num: int, dim: int, seed: int) -> torch.Tensor:
    """An S-curve (a 2-D sheet bent twice, sklearn's make_s_curve shape) on a small cap of the sphere in `dim`-D."""
    rng = np.random.default_rng(seed)
    t_N = 3.0 * np.pi * (rng.uniform(size=num) - 0.5)
    points_N3 = np.stack([np.sin(t_N), 2.0 * rng.uniform(size=num), np.sign(t_N) * (np.cos(t_N) - 1.0)], axis=1)
    basis_D3 = np.linalg.qr(rng.standard_normal((dim - 1, 3)))[0]
    lifted_ND = np.zeros((num, dim))
    lifted_ND[:, 0] = 1.0
    lifted_ND[:, 1:] = SCALE * points_N3 @ basis_D3.T
    return torch.tensor(lifted_ND / np.linalg.norm(lifted_ND, axis=1, keepdims=True), dtype=torch.float32)


def test_the_15_sphere_is_flagged_and_the_s_curve_is_not():
    """Measured (seed 0): 15-sphere in 16-D: intrinsic dimension 13.2, short-range stretch 1.82, rank agreement 0.68;
    S-curve in 128-D: 1.94, 1.03, 0.96. Flagged above SHORT_RANGE_STRETCH_MAX = 1.25."""
    sphere = GeodesicSnapshot.build(sphere_points(3000, 16, 0), torch.arange(3000), k=10).stats
    curve = GeodesicSnapshot.build(s_curve(3000, 128, 0), torch.arange(3000), k=10).stats
    assert sphere["trusted"] == 0.0 and curve["trusted"] == 1.0
    assert sphere["short_range_stretch"] > 1.5 and curve["short_range_stretch"] < 1.1 < SHORT_RANGE_STRETCH_MAX
    assert sphere["rank_agreement"] < 0.8 < 0.9 < curve["rank_agreement"]
    assert 10.0 < sphere["intrinsic_dimension"] < 17.0 and 1.5 < curve["intrinsic_dimension"] < 2.5


def test_a_flagged_refresh_warns_once_and_the_run_summary_says_so(tiny_lm, capsys):
    from test_alignment_mechanics import tiny_objective

    objective = tiny_objective(tiny_lm, negatives="geodesic_hard", bank_size=512, geodesic_k=10, embed_dim=16)
    points_ND = sphere_points(512, 16, 1)
    objective.bank.enqueue_gathered(points_ND, points_ND, torch.zeros(512, 3), torch.arange(512), step=0)
    assert objective.summary_lines() == []
    objective.refresh_geodesics(step=4)
    objective.refresh_geodesics(step=8)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: geodesic graph")]
    assert len(warnings) == 2 and "step 4" in warnings[0]
    scalars = objective.scalars()
    assert scalars["geodesic/trusted"] == 0.0 and scalars["geodesic/intrinsic_dimension"] > 5
    assert objective.summary_lines()[0].startswith("geodesics: 2 of 2 graph refreshes could not follow the bank")


def test_geodesic_stretch_tool_reports_percentiles_per_range(tmp_path):
    """launcher.geodesic_stretch at toy size (the README's table comes from it at 65,536 x 512): every row
    has the stretch percentiles of each range, and with the exact balls (radius = limit, none capped)
    every pair inside the limit is exact while the landmark bound alone is not."""
    import json

    from launcher.geodesic_stretch import main as stretch_main

    out = tmp_path / "stretch.json"
    stretch_main(["--nodes", "2000", "--dim", "32", "--ks", "5", "--landmarks", "16", "--anchors", "8",
                  "--step-ms", "100", "--out", str(out)])
    results = json.loads(out.read_text())
    rows = {row["balls"]: row for row in results["rows"]}
    assert len(results["rows"]) == 2 and set(rows) == {False, True}
    for row in rows.values():
        for name in ("radius", "limit", "pool"):
            stats = row[name]
            assert stats["pairs"] > 0 and 1.0 - 1e-6 <= stats["p10"] <= stats["p50"] <= stats["p90"], (name, stats)
        assert row["refresh_share"] == pytest.approx(row["refresh_s"] / (50 * 0.1)) and row["refresh_cpu_s"] > 0
    with_balls, bound_only = rows[True], rows[False]
    assert with_balls["ball_capped_fraction"] == 0.0
    assert all(with_balls[name]["p90"] == pytest.approx(1.0, abs=1e-5) for name in ("radius", "limit", "pool"))
    assert with_balls["pool_falsely_beyond_limit"] == 0.0 and with_balls["hard_pick_overlap"] == 1.0
    assert bound_only["limit"]["p50"] > 1.5  # the bound alone detours through landmarks


def test_the_run_reports_bank_section_shows_the_trust_statistics_and_the_flagged_count(tmp_path):
    """The report's bank section charts the per-refresh trust scalars and says how many refreshes eval.json counts as flagged."""
    import json

    from vlpdist.monitor.tensorboard import TensorBoardLogger
    from vlpdist.report.page import RunFiles, section_bank

    run_dir = tmp_path / "run"
    tb = TensorBoardLogger(run_dir / "tb", True)
    for step in (50, 100):
        tb.scalars({"align/bank_fill": 512.0, "geodesic/snapshot_step": float(step), "geodesic/intrinsic_dimension": 13.2,
                    "geodesic/short_range_stretch": 1.8, "geodesic/rank_agreement": 0.68, "geodesic/trusted": 0.0}, step)
    tb.close()
    (run_dir / "eval.json").write_text(json.dumps({"geodesics": {
        "refreshes": 2, "untrusted_refreshes": 2, "last_intrinsic_dimension": 13.2, "last_short_range_stretch": 1.8,
        "last_rank_agreement": 0.68}}))
    page = section_bank(RunFiles(root=None, run_dir=run_dir))
    assert "2 of 2 graph refreshes could not follow the bank" in page and "short-range stretch 1.80" in page
    assert "intrinsic dimension of the bank (TwoNN)" in page and "rank agreement of graph and cosine" in page
