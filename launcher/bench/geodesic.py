"""Geodesic snapshot cost per k-NN backend: the refresh (k-NN + graph + landmark Dijkstra) and each step's distances.

`python -m launcher.bench.geodesic [--nodes 65536 --dim 512 --k 10 --anchors 32]`

The nodes are synthetic bank-like embeddings: a mixture of Gaussian clusters in a 16-dimensional
latent space, mapped to `dim` by a random linear map, with a little isotropic noise, then
normalised (unit-norm like the bank, with a low intrinsic dimension so that the k-NN graph has
manifold structure; plain Gaussian vectors in 512-D are all nearly orthogonal). Anchors are new
draws from the same mixture. Times are time.perf_counter on this machine: the refresh once per
backend, the per-step distances as the median of `--repeats` calls after one warm-up call.
`recall_at_k` is the fraction of exact k nearest neighbours (torch brute force) that the backend
finds for a sample of nodes. Exact per-step distances run with `limit` (by default the lower
quartile of the landmark distances, reported) and once without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from vlpdist.geodesic import BACKENDS, GeodesicSnapshot, build_knn_index, search_knn

LATENT_DIM = 16
LATENT_CLUSTERS = 256
RECALL_QUERIES = 1000


def make_embeddings(num: int, dim: int, seed: int, device: str) -> torch.Tensor:
    """(num, dim) unit vectors from the latent cluster mixture described in the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    # The mixture itself (centres, map) is fixed across calls; `seed` only draws the points.
    fixed = torch.Generator().manual_seed(12345)
    centers_CL = 2.0 * torch.randn(LATENT_CLUSTERS, LATENT_DIM, generator=fixed)
    map_LD = torch.randn(LATENT_DIM, dim, generator=fixed) / LATENT_DIM**0.5
    cluster_M = torch.randint(LATENT_CLUSTERS, (num,), generator=generator)
    latent_ML = centers_CL[cluster_M] + torch.randn(num, LATENT_DIM, generator=generator)
    points_MD = latent_ML @ map_LD + 0.1 * torch.randn(num, dim, generator=generator)
    return torch.nn.functional.normalize(points_MD, dim=1).to(device)


def time_calls(function, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure_recall(nodes_ND: torch.Tensor, snapshot: GeodesicSnapshot, k: int) -> float:
    """Fraction of the exact k nearest nodes of a fixed sample of nodes that the snapshot's index returns."""
    sample_Q = torch.linspace(0, nodes_ND.shape[0] - 1, RECALL_QUERIES).long().unique()
    queries_QD = nodes_ND[sample_Q]
    exact_QK, _ = search_knn(build_knn_index(nodes_ND, "torch"), queries_QD, k)
    found_QK, _ = search_knn(snapshot.knn_index, queries_QD, k)
    return (found_QK[:, :, None] == exact_QK[:, None, :]).any(dim=1).float().mean().item()


def run_benchmark(
    nodes: int = 65536,
    dim: int = 512,
    k: int = 10,
    anchors: int = 32,
    backends: tuple[str, ...] = BACKENDS,
    num_landmarks: int = 64,
    limit: float | None = None,
    repeats: int = 3,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """{backend: {build_knn_s, refresh_s, exact_step_s, exact_unlimited_step_s, landmarks_step_s, limit,
    recall_at_k, stats}} plus the run's settings under "settings"."""
    nodes_ND = make_embeddings(nodes, dim, seed, device)
    anchors_BD = make_embeddings(anchors, dim, seed + 1, device)
    results = {
        "settings": {"nodes": nodes, "dim": dim, "k": k, "anchors": anchors, "num_landmarks": num_landmarks,
                     "device": device, "torch_threads": torch.get_num_threads()}
    }
    for backend in backends:
        snapshot = GeodesicSnapshot.build(
            nodes_ND, torch.arange(nodes, device=device), k=k, backend=backend, method="landmarks",
            num_landmarks=num_landmarks, seed=seed,
        )
        stats = snapshot.stats
        landmark_distance = snapshot.landmark_distance_LN
        finite_landmark_distance = landmark_distance[landmark_distance.isfinite()]
        step_limit = limit if limit is not None else float(finite_landmark_distance.quantile(0.25))
        landmarks_step_s = time_calls(lambda: snapshot.distances(anchors_BD, method="landmarks"), repeats)
        snapshot.limit = float("inf")
        exact_unlimited_step_s = time_calls(lambda: snapshot.distances(anchors_BD, method="exact"), 1)
        # The limit is read at each call, so one snapshot serves both exact timings.
        snapshot.limit = step_limit
        exact_step_s = time_calls(lambda: snapshot.distances(anchors_BD, method="exact"), repeats)
        _, reachable_BN = snapshot.distances(anchors_BD, method="exact")
        results[backend] = {
            "build_knn_s": stats["build_knn_s"],
            "refresh_s": stats["build_knn_s"] + stats["build_graph_s"] + stats["build_paths_s"],
            "exact_step_s": exact_step_s,
            "exact_unlimited_step_s": exact_unlimited_step_s,
            "landmarks_step_s": landmarks_step_s,
            "limit": step_limit,
            "reachable_within_limit": reachable_BN.float().mean().item(),
            "recall_at_k": measure_recall(nodes_ND, snapshot, k),
            "stats": stats,
        }
        print(f"{backend}: {json.dumps(results[backend])}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--anchors", type=int, default=32)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--num-landmarks", type=int, default=64)
    parser.add_argument(
        "--limit", type=float, default=None, help="exact-mode Dijkstra limit (default: landmark distance quartile)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    return run_benchmark(
        nodes=args.nodes, dim=args.dim, k=args.k, anchors=args.anchors, backends=tuple(args.backends),
        num_landmarks=args.num_landmarks, limit=args.limit, repeats=args.repeats, seed=args.seed, device=args.device,
    )


if __name__ == "__main__":
    main()
