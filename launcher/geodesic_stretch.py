"""Landmark geodesics measured where they act: stretch (estimate / exact graph distance) at bank scale.

`python -m launcher.geodesic_stretch [--nodes 65536 --dim 512 --ks 5 10 20 --landmarks 64 256 1024 --out FILE]`

The bank is a fixed-seed mixture on the unit sphere shaped like CLIP embeddings (random pairs at
cosine ~0.35 around a common direction, nearest neighbours at ~0.97): 60 % of the points in
Gaussian clusters spread over 16-D subspaces, 40 % on 2-D Swiss-roll sheets (the low-dimensional
manifold part) in 3-D subspaces, all with a little isotropic noise in every dimension. Anchors are
new draws, as a step's batch is new to the bank's graph. The k-NN graph is the training one
(`GeodesicSnapshot`, FAISS flat inner-product search, chord-length edges). "exact" is scipy's
Dijkstra from the anchors (the snapshot's `exact` method, no limit); "landmarks" is the estimate
training uses: with `--limit` finite, each node's exact ball of radius limit (`graph.local_balls`)
plus the landmark bound; "landmarks only" is the bound alone (as before the balls existed).

Stretch is reported in the ranges where the objective reads distances (AlignConfig defaults):
`radius`: pairs whose exact distance is under false_negative_radius; `limit`: from the radius to
geodesic_limit; `pool`: each anchor's hard_negative_pool cosine-nearest bank entries within the limit (where hard
negatives are picked). For the pool, also: the share of entries within the limit that the estimate
puts beyond it, and the overlap of the hard picks (top hard_negatives by stretch) with the exact picks.

Costs are time.perf_counter on this machine, with the process's CPU seconds beside them (`*_cpu_s`, all
threads: on a machine shared with other work the wall time grows with the load, the CPU time much less;
Dijkstra is one thread, so its CPU seconds are its wall time on an idle core): the k-NN search is measured once at the largest k
(a smaller k costs about the same: the search is brute force); landmark picking is measured at the
largest count (farthest-point sampling is one full Dijkstra per landmark, so L landmarks cost L / max
of it); balls once per k. `--step-ms` (an aligned training step, e.g. from `launcher.bench.train`'s
aligned_step_ms) turns the refresh into a share of the steps between refreshes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch

from vlpdist.atomic import refuse_foreign_output_file, write_output_json
from vlpdist.config import AlignConfig
from vlpdist.errors import exit_on_user_error
from vlpdist.geodesic import GeodesicSnapshot, build_knn_index, search_knn
from vlpdist.geodesic.graph import local_balls, pick_landmarks

CLUSTERS, CLUSTER_DIM, CLUSTER_SPREAD = 32, 16, 0.25
SHEETS, SHEET_SCALE = 8, 0.06
MEAN_WEIGHT, NOISE = 1.0, 0.012
SHEET_SHARE = 0.4


def make_bank(num: int, dim: int, seed: int) -> np.ndarray:
    """(num, dim) float32 unit vectors from the mixture in the module docstring; the mixture is fixed, `seed` draws points."""
    rng, fixed = np.random.default_rng(seed), np.random.default_rng(12345)
    mean_D = fixed.standard_normal(dim)
    mean_D /= np.linalg.norm(mean_D)
    centres_CD = fixed.standard_normal((CLUSTERS, dim))
    centres_CD /= np.linalg.norm(centres_CD, axis=1, keepdims=True)
    basis_CDL = np.linalg.qr(fixed.standard_normal((CLUSTERS, dim, CLUSTER_DIM)))[0]
    sheet_centres_SD = fixed.standard_normal((SHEETS, dim))
    sheet_centres_SD /= np.linalg.norm(sheet_centres_SD, axis=1, keepdims=True)
    sheet_basis_SD3 = np.linalg.qr(fixed.standard_normal((SHEETS, dim, 3)))[0]
    num_sheet = int(SHEET_SHARE * num)
    num_cluster = num - num_sheet
    points_ND = np.empty((num, dim))
    cluster_n = rng.integers(CLUSTERS, size=num_cluster)
    latent_nL = CLUSTER_SPREAD * rng.standard_normal((num_cluster, CLUSTER_DIM))
    points_ND[:num_cluster] = centres_CD[cluster_n] + np.einsum("ndl,nl->nd", basis_CDL[cluster_n], latent_nL)
    sheet_s = rng.integers(SHEETS, size=num_sheet)
    turn_s = rng.uniform(1.5 * np.pi, 4.5 * np.pi, num_sheet)
    height_s = rng.uniform(0.0, 10.0, num_sheet)
    roll_s3 = SHEET_SCALE * np.stack([turn_s * np.cos(turn_s), height_s, turn_s * np.sin(turn_s)], axis=1)
    points_ND[num_cluster:] = sheet_centres_SD[sheet_s] + np.einsum("ndl,nl->nd", sheet_basis_SD3[sheet_s], roll_s3)
    points_ND += MEAN_WEIGHT * mean_D + NOISE * rng.standard_normal((num, dim))
    points_ND /= np.linalg.norm(points_ND, axis=1, keepdims=True)
    return points_ND.astype(np.float32)


def percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"pairs": 0, "p10": None, "p50": None, "p90": None}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"pairs": int(values.size), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


def stretch_in_ranges(estimate_BN: np.ndarray, exact_BN: np.ndarray, pool_BP: np.ndarray, chord_BP: np.ndarray,
                      align: AlignConfig) -> dict:
    """Stretch percentiles per range, and the pool's falsely-unreachable share and hard-pick overlap."""
    radius, limit = align.false_negative_radius, align.geodesic_limit
    positive_BN = exact_BN > 0  # a node equal to the anchor has stretch 0/0
    in_radius_BN = positive_BN & (exact_BN < radius)
    in_limit_BN = (exact_BN >= radius) & (exact_BN <= limit)
    stretch_BN = np.where(positive_BN, estimate_BN / np.where(positive_BN, exact_BN, 1.0), 1.0)
    pool_exact_BP = np.take_along_axis(exact_BN, pool_BP, axis=1)
    pool_estimate_BP = np.take_along_axis(estimate_BN, pool_BP, axis=1)
    pool_positive_BP = pool_exact_BP > 0
    within_BP = pool_exact_BP <= limit
    # Hard picks as training makes them: beyond the limit = far (a distance past every reachable one).
    def picks(distance_BP):
        reach_BP = distance_BP <= limit
        filled_BP = np.where(reach_BP, distance_BP, distance_BP[reach_BP].max(initial=0.0) + 1.0)
        return np.argsort(-(filled_BP / chord_BP), axis=1, kind="stable")[:, : align.hard_negatives]
    exact_pick_BH, estimate_pick_BH = picks(pool_exact_BP), picks(pool_estimate_BP)
    overlap = np.mean([len(set(a) & set(b)) / a.size for a, b in zip(exact_pick_BH, estimate_pick_BH)])
    return {
        "radius": percentiles(stretch_BN[in_radius_BN]),
        "limit": percentiles(stretch_BN[in_limit_BN]),
        # Within the limit only: beyond it what matters is that the estimate is beyond it too (the bound is >= exact).
        "pool": percentiles((pool_estimate_BP / np.where(pool_positive_BP, pool_exact_BP, 1.0))[pool_positive_BP & within_BP]),
        "pool_within_limit": float(within_BP.mean()),
        "pool_falsely_beyond_limit": float(((pool_estimate_BP > limit) & within_BP).sum() / max(within_BP.sum(), 1)),
        "hard_pick_overlap": float(overlap),
    }


def run(nodes: int, dim: int, ks: list[int], landmark_counts: list[int], anchors: int, seed: int,
        step_ms: float | None) -> dict:
    align = AlignConfig()
    started = time.perf_counter()
    points_MD = make_bank(nodes + anchors, dim, seed)
    nodes_ND, anchors_BD = torch.from_numpy(points_MD[:nodes]), torch.from_numpy(points_MD[nodes:])
    generate_s = time.perf_counter() - started
    cosine_BN = (anchors_BD @ nodes_ND.T).numpy()
    pool_BP = np.argsort(-cosine_BN, axis=1, kind="stable")[:, : align.hard_negative_pool]
    chord_BP = np.sqrt(np.clip(2.0 - 2.0 * np.take_along_axis(cosine_BN, pool_BP, axis=1), 1e-12, None))
    random_cos = float(np.median(cosine_BN))

    started, started_cpu = time.perf_counter(), time.process_time()
    index = build_knn_index(nodes_ND, "faiss_flat")
    neighbor_NK, _ = search_knn(index, nodes_ND, max(ks), exclude_self=True)
    knn_s, knn_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    results = {"settings": {"nodes": nodes, "dim": dim, "anchors": anchors, "seed": seed, "ks": ks,
                            "landmarks": landmark_counts, "radius": align.false_negative_radius,
                            "limit": align.geodesic_limit, "pool": align.hard_negative_pool,
                            "hard_negatives": align.hard_negatives, "median_anchor_cosine": random_cos,
                            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                            "generate_s": generate_s, "knn_search_s_at_max_k": knn_s, "knn_search_cpu_s_at_max_k": knn_cpu_s,
                            "load_average_1min": os.getloadavg()[0], "step_ms": step_ms},
               "rows": []}
    print(f"bank {nodes:,} x {dim} generated in {generate_s:.0f} s; k-NN (faiss_flat, k={max(ks)}) {knn_s:.0f} s", flush=True)
    for k in ks:
        started, started_cpu = time.perf_counter(), time.process_time()
        base = GeodesicSnapshot.from_neighbors(nodes_ND, torch.arange(nodes), index, neighbor_NK[:, :k].contiguous(),
                                               method="exact")
        graph_s, graph_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
        exact_BN = base.distances(anchors_BD, method="exact")[0].numpy().astype(np.float64)
        started, started_cpu = time.perf_counter(), time.process_time()
        landmark_L, landmark_LN = pick_landmarks(base.graph, max(landmark_counts), base.stats["connected_components"], seed)
        landmarks_s, landmarks_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
        started, started_cpu = time.perf_counter(), time.process_time()
        ball_index, ball_distance, ball_stats = local_balls(base.graph, align.geodesic_limit, align.geodesic_local_nodes)
        balls_s, balls_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
        first_hop = {"k": k, "components": base.stats["connected_components"],
                     "largest_component_fraction": base.stats["largest_component_fraction"]}
        for count in landmark_counts:
            count = max(count, base.stats["connected_components"])  # as pick_landmarks raises it
            landmark_variant = dataclasses.replace(
                base, method="landmarks", limit=float("inf"), anchor_buffer=None,
                landmark_L=torch.from_numpy(landmark_L[:count]),
                landmark_distance_LN=torch.from_numpy(landmark_LN[:count].astype(np.float32)),
            )
            for with_balls in (False, True):
                variant = landmark_variant
                if with_balls:
                    variant = dataclasses.replace(landmark_variant, ball_index_NM=torch.from_numpy(ball_index),
                                                  ball_distance_NM=torch.from_numpy(ball_distance),
                                                  ball_radius=align.geodesic_limit)
                started, started_cpu = time.perf_counter(), time.process_time()
                estimate_BN = variant.distances(anchors_BD, method="landmarks")[0].numpy().astype(np.float64)
                step_s, step_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
                refresh_s = knn_s + graph_s + landmarks_s * count / max(landmark_counts) + (balls_s if with_balls else 0.0)
                refresh_cpu_s = (knn_cpu_s + graph_cpu_s + landmarks_cpu_s * count / max(landmark_counts)
                                 + (balls_cpu_s if with_balls else 0.0))
                row = {**first_hop, "landmarks": count, "balls": with_balls, **(ball_stats if with_balls else {}),
                       **stretch_in_ranges(estimate_BN, exact_BN, pool_BP, chord_BP, align),
                       "refresh_s": refresh_s, "knn_s": knn_s, "graph_s": graph_s,
                       "landmarks_s": landmarks_s * count / max(landmark_counts), "balls_s": balls_s if with_balls else 0.0,
                       "distances_s_per_anchor": step_s / anchors, "distances_cpu_s_per_anchor": step_cpu_s / anchors,
                       "refresh_cpu_s": refresh_cpu_s, "knn_cpu_s": knn_cpu_s,
                       "graph_cpu_s": graph_cpu_s, "landmarks_cpu_s": landmarks_cpu_s * count / max(landmark_counts),
                       "balls_cpu_s": balls_cpu_s if with_balls else 0.0}
                if step_ms:
                    row["refresh_share"] = refresh_s / (align.geodesic_refresh_every * step_ms / 1e3)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    return results


def fmt(stats: dict) -> str:
    if not stats["pairs"]:
        return "-"
    return f"{stats['p10']:.2f} / {stats['p50']:.2f} / {stats['p90']:.2f}"


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        f"Stretch (estimate / exact) p10 / p50 / p90; bank {settings['nodes']:,} x {settings['dim']}, "
        f"{settings['anchors']} anchors; radius {settings['radius']}, limit {settings['limit']}, pool {settings['pool']}.",
        "",
        "| k | landmarks | balls | d < radius | radius..limit | hard pool | pool falsely beyond limit | hard-pick overlap | refresh s | refresh CPU s | share of refresh interval |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        share = f"{row['refresh_share']:.2f}" if "refresh_share" in row else "-"
        lines.append(
            f"| {row['k']} | {row['landmarks']} | {'yes' if row['balls'] else 'no'} | {fmt(row['radius'])} | {fmt(row['limit'])} | "
            f"{fmt(row['pool'])} | {row['pool_falsely_beyond_limit']:.2f} | {row['hard_pick_overlap']:.2f} | "
            f"{row['refresh_s']:.1f} | {row['refresh_cpu_s']:.1f} | {share} |"
        )
    return "\n".join(lines)


WRITER = "launcher.geodesic_stretch"  # names --out's file as this command's own, which a rerun may replace


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--landmarks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-ms", type=float, default=None, help="an aligned training step in ms (launcher.bench.train)")
    parser.add_argument("--out", default="geodesic_stretch.json",
                        help="JSON file: new, empty, or this command's earlier output (replaced atomically)")
    args = parser.parse_args(argv)
    if min(args.ks) < 1 or args.nodes <= max(args.ks) or min(args.landmarks) < 1 or args.anchors < 1:
        print("error: need nodes > k >= 1, landmarks >= 1 and anchors >= 1", file=sys.stderr)
        raise SystemExit(2)
    refuse_foreign_output_file(args.out, WRITER, "--out")  # before minutes of measuring; checked again when written
    results = run(args.nodes, args.dim, args.ks, args.landmarks, args.anchors, args.seed, args.step_ms)
    table = markdown(results)
    print(table)
    write_output_json(args.out, results, WRITER, "--out")
    return results


if __name__ == "__main__":
    main()
