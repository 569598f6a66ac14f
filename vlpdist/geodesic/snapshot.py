"""Geodesic distances from a step's anchors to a snapshot of the memory bank.

Every R steps the trainer builds a `GeodesicSnapshot` over the bank's embeddings (the nodes): a
symmetrised k-NN graph whose edges are weighted by the chord length between the unit vectors,
sqrt(2 (1 - cos)) = |x - y| (the cosine distance made a metric: 1 - cos itself is a squared
length, and shortest paths over squared lengths shrink towards 0 as sampling gets denser, so a
path could come out shorter than the straight line), its connected components, and, in
`landmarks` mode, graph distances from a few landmark nodes. Between refreshes each step calls
`distances(anchors_BD)`. Anchors are new embeddings, not graph nodes: an anchor joins the graph
through its k nearest nodes, so

    d(a, j) = min over a's k nearest nodes n of [ |a - x_n| + G(n, j) ],   G = graph shortest path.

`exact` answers that with scipy's Dijkstra from the anchors on the host; `landmarks` bounds it
from above with device tensor ops only (the path that pays on a GPU for big banks).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vlpdist.geodesic.graph import (
    AnchorGraphBuffer, CsrGraph, build_symmetric_graph, find_first_hops, local_balls, pick_landmarks,
)
from vlpdist.geodesic.knn import KnnIndex, build_knn_index, search_knn
from vlpdist.geodesic.trust import assess

METHODS = ("exact", "landmarks")
# The landmark bound's (B, L, n) blocks hold at most this many entries (64 MiB in float32).
LANDMARK_BLOCK_ENTRIES = 1 << 24


def chord_lengths(nodes_ND: torch.Tensor, neighbor_NK: torch.Tensor, rows_per_block: int = 4096) -> torch.Tensor:
    """(N, K) |x_i - x_n| of each node to its neighbours, from the vectors (not from sqrt(2 (1 - cos)):
    1 - cos of near neighbours in float32 keeps only a few digits), in blocks of rows to bound memory."""
    return torch.cat([
        (nodes_ND[start : start + rows_per_block, None, :] - nodes_ND[neighbor_NK[start : start + rows_per_block]]).norm(dim=-1)
        for start in range(0, nodes_ND.shape[0], rows_per_block)
    ])


def differentiable_chord(queries_BD: torch.Tensor, neighbors_BKD: torch.Tensor) -> torch.Tensor:
    """(B, K) |q - x_n| with a gradient of norm <= 1 everywhere (the eps keeps it finite at q = x_n)."""
    return (((queries_BD[:, None, :] - neighbors_BKD) ** 2).sum(dim=-1) + 1e-12).sqrt()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that a perf_counter interval covers the work it times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GeodesicSnapshot:
    """A k-NN graph over a bank snapshot and what `distances` needs to answer from it.

    nodes_ND: the snapshot's unit-norm embeddings (float32, training device). node_ids_N: the
    bank's sample ids of those rows, to tell which nodes the bank still holds (`live_mask`).
    knn_index: the index the graph was built with; anchors are searched against the same one.
    graph: the symmetrised k-NN graph on the host. component_N: connected-component label of each
    node. landmark_L / landmark_distance_LN: landmark nodes and their graph distances to all
    nodes (float32 on the nodes' device, inf outside the landmark's component); empty in `exact`
    mode. limit: paths longer than this count as unreachable. ball_index_NM / ball_distance_NM
    (`landmarks` mode with a finite limit): each node's exact graph distances to the nodes within
    ball_radius (= the limit at build) of it, at most `local_nodes` of them (`graph.local_balls`);
    (N, 0) otherwise. With them the landmark method is exact wherever the exact distance is within
    ball_radius (unless a ball was capped), so distances, reachability and hard picks inside the
    limit are the exact ones; beyond, the landmark bound (>= exact) still says "beyond the limit".
    """

    nodes_ND: torch.Tensor
    node_ids_N: torch.Tensor
    k: int
    method: str
    limit: float
    knn_index: KnnIndex
    graph: CsrGraph
    component_N: np.ndarray
    landmark_L: torch.Tensor
    landmark_distance_LN: torch.Tensor
    ball_index_NM: torch.Tensor | None = None
    ball_distance_NM: torch.Tensor | None = None
    ball_radius: float = 0.0
    stats: dict = field(default_factory=dict)
    anchor_buffer: AnchorGraphBuffer | None = None

    @classmethod
    def build(
        cls,
        nodes_ND: torch.Tensor,
        node_ids_N: torch.Tensor,
        *,
        k: int = 10,
        backend: str = "torch",
        method: str = "exact",
        num_landmarks: int = 64,
        limit: float = float("inf"),
        local_nodes: int = 1024,
        seed: int = 0,
        knn_options: dict | None = None,
    ) -> "GeodesicSnapshot":
        """Build the graph over nodes_ND (N, D), unit-norm. backend: see `build_knn`; knn_options go
        to `build_knn_index` (ivf_lists, ivf_probes, hnsw_m, hnsw_ef_search). method: `exact` or
        `landmarks` (then `num_landmarks`, raised to one per connected component, are picked by
        farthest-point sampling from a node drawn with `seed`; with a finite `limit`, each node's exact
        distances to at most `local_nodes` nodes within the limit are kept too, `local_nodes=0`: none)."""
        from scipy.sparse.csgraph import connected_components

        if method not in METHODS:
            raise ValueError(f"geodesic method {method!r}; choose one of {METHODS}")
        if node_ids_N.shape != nodes_ND.shape[:1]:
            raise ValueError(f"node ids of shape {tuple(node_ids_N.shape)} for {nodes_ND.shape[0]} nodes")
        nodes_ND = nodes_ND.detach().float().contiguous()
        device = nodes_ND.device

        synchronize(device)
        started = time.perf_counter()
        knn_index = build_knn_index(nodes_ND, backend, seed=seed, **(knn_options or {}))
        neighbor_NK, _ = search_knn(knn_index, nodes_ND, k, exclude_self=True)
        synchronize(device)
        knn_build_s = time.perf_counter() - started
        return cls.from_neighbors(nodes_ND, node_ids_N, knn_index, neighbor_NK, method=method, num_landmarks=num_landmarks,
                                  limit=limit, local_nodes=local_nodes, seed=seed, knn_build_s=knn_build_s)

    @classmethod
    def from_neighbors(
        cls,
        nodes_ND: torch.Tensor,
        node_ids_N: torch.Tensor,
        knn_index: KnnIndex,
        neighbor_NK: torch.Tensor,
        *,
        method: str = "exact",
        num_landmarks: int = 64,
        limit: float = float("inf"),
        local_nodes: int = 1024,
        seed: int = 0,
        knn_build_s: float = 0.0,
        landmarks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> "GeodesicSnapshot":
        """The rest of `build` from each node's k nearest other nodes (N, K), nearest first: the graph, its
        components and the landmarks. Neighbours searched once for a larger k serve every smaller k as
        their first columns (the stretch measurement builds several graphs from one search this way).
        landmarks: (landmark_L, landmark_distance_LN) already picked on this graph (farthest-point
        sampling's first L of a longer run are its L-landmark answer), instead of picking them here."""
        from scipy.sparse.csgraph import connected_components

        if method not in METHODS:
            raise ValueError(f"geodesic method {method!r}; choose one of {METHODS}")
        device = nodes_ND.device
        k = neighbor_NK.shape[1]
        knn_done = time.perf_counter()
        chord_NK = chord_lengths(nodes_ND, neighbor_NK).cpu().numpy()
        graph = build_symmetric_graph(neighbor_NK.cpu().numpy(), chord_NK)
        num_components, component_N = connected_components(graph.to_scipy(), directed=False)
        graph_done = time.perf_counter()
        # Whether these geodesics can be trusted (intrinsic dimension, short-range stretch on a probe): see `trust`.
        trust_stats = assess(graph, nodes_ND, chord_NK, seed) if k >= 2 else {}
        trust_stats["build_trust_s"] = time.perf_counter() - graph_done
        graph_done = time.perf_counter()

        ball_stats = {}
        ball_index_NM = torch.empty(nodes_ND.shape[0], 0, dtype=torch.int64, device=device)
        ball_distance_NM = torch.empty(nodes_ND.shape[0], 0, device=device)
        ball_radius = 0.0
        if method == "landmarks":
            if landmarks is None:
                landmarks = pick_landmarks(graph, num_landmarks, num_components, seed)
            landmark_L = torch.from_numpy(landmarks[0]).to(device)
            landmark_distance_LN = torch.from_numpy(landmarks[1].astype(np.float32)).to(device)
            landmarks_done = time.perf_counter()
            if math.isfinite(limit) and local_nodes > 0:
                ball_index_host, ball_distance_host, ball_stats = local_balls(graph, limit, local_nodes)
                ball_index_NM = torch.from_numpy(ball_index_host).to(device)
                ball_distance_NM = torch.from_numpy(ball_distance_host).to(device)
                ball_radius = limit
            ball_stats["build_balls_s"] = time.perf_counter() - landmarks_done
        else:
            landmark_L = torch.empty(0, dtype=torch.int64, device=device)
            landmark_distance_LN = torch.empty(0, nodes_ND.shape[0], device=device)
        synchronize(device)
        paths_done = time.perf_counter()

        component_sizes = np.bincount(component_N)
        stats = {
            "nodes": nodes_ND.shape[0],
            "edges": int(graph.indices.shape[0]) // 2,
            "connected_components": int(num_components),
            "largest_component_fraction": float(component_sizes.max() / nodes_ND.shape[0]),
            "mean_degree": float(graph.indices.shape[0] / nodes_ND.shape[0]),
            "landmarks": int(landmark_L.shape[0]),
            "build_knn_s": knn_build_s,
            "build_graph_s": graph_done - knn_done,
            "build_paths_s": paths_done - graph_done,
            **ball_stats,
            **trust_stats,
        }
        return cls(
            nodes_ND=nodes_ND,
            node_ids_N=node_ids_N.detach(),
            k=k,
            method=method,
            limit=limit,
            knn_index=knn_index,
            graph=graph,
            component_N=component_N,
            landmark_L=landmark_L,
            landmark_distance_LN=landmark_distance_LN,
            ball_index_NM=ball_index_NM,
            ball_distance_NM=ball_distance_NM,
            ball_radius=ball_radius,
            stats=stats,
        )

    def live_mask(self, bank_sample_ids: torch.Tensor) -> torch.Tensor:
        """(N,) bool: True where the bank still holds the entry node n was built from (its sample id is in the bank)."""
        return torch.isin(self.node_ids_N, bank_sample_ids.to(self.node_ids_N.device))

    def distances(self, anchors_BD: torch.Tensor, *, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(geodesic_BN, reachable_BN bool) from each anchor to every snapshot node, on the anchors' device.

        geodesic_BN has the anchors' floating dtype (float32 in training) and is differentiable with
        respect to the anchors through the first hop |a - x_n|. method: the snapshot's own by
        default; `exact` works on any snapshot, `landmarks` needs one built with landmarks.

        Unreachable pairs (another connected component, or a path longer than `limit`) have
        reachable=False and distance = (largest reachable distance in the anchor's row) + 1, a
        finite constant without gradient, so that they rank beyond every reachable node and no
        inf/NaN reaches a loss.
        """
        method = method or self.method
        if method == "landmarks" and self.landmark_L.numel() == 0:
            raise ValueError("landmark distances asked of a snapshot built with method='exact'")
        if method not in METHODS:
            raise ValueError(f"geodesic method {method!r}; choose one of {METHODS}")
        compute_dtype = anchors_BD.dtype if anchors_BD.is_floating_point() else torch.float32
        queries_BD = anchors_BD.to(device=self.nodes_ND.device, dtype=compute_dtype)
        neighbor_BK, _ = search_knn(self.knn_index, queries_BD, self.k)
        # The differentiable first hop, recomputed from the anchors: (B, K, D) -> (B, K). Dijkstra
        # gets the same values, so the path it picks is the one whose length is returned.
        first_hop_BK = differentiable_chord(queries_BD, self.nodes_ND[neighbor_BK].to(compute_dtype))
        host_distance_BK = first_hop_BK.detach()
        if method == "exact":
            geodesic_BN, reachable_BN = self.exact_distances(first_hop_BK, neighbor_BK, host_distance_BK)
        else:
            geodesic_BN, reachable_BN = self.landmark_distances(first_hop_BK, neighbor_BK)
            reachable_BN &= geodesic_BN <= self.limit
        geodesic_BN = fill_unreachable(geodesic_BN, reachable_BN)
        return geodesic_BN.to(anchors_BD.device), reachable_BN.to(anchors_BD.device)

    def exact_distances(
        self, first_hop_BK: torch.Tensor, neighbor_BK: torch.Tensor, host_distance_BK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dijkstra from the anchors as extra source nodes of the graph, then the first hop of each path.

        scipy gives the exact distances (from the host copy of the first-hop weights) and the
        predecessors; the first hop n of the path to j splits that distance into the edge
        a -> n and the graph part G(n, j). Swapping the host edge for the differentiable
        first_hop_BK keeps the value and lets the gradient through.
        """
        from scipy.sparse.csgraph import dijkstra

        num_anchors = first_hop_BK.shape[0]
        num_nodes = self.graph.num_nodes
        if self.anchor_buffer is None:
            self.anchor_buffer = AnchorGraphBuffer(self.graph)
        neighbor_host_BK = neighbor_BK.cpu().numpy()
        edge_host_BK = host_distance_BK.cpu().numpy().astype(np.float64)
        augmented = self.anchor_buffer.with_anchors(neighbor_host_BK, edge_host_BK)
        source_B = np.arange(num_nodes, num_nodes + num_anchors)
        limit = self.limit if math.isfinite(self.limit) else np.inf
        exact_BM, predecessor_BM = dijkstra(
            augmented, directed=True, indices=source_B, return_predecessors=True, limit=limit
        )
        exact_BN = exact_BM[:, :num_nodes]
        reachable_BN = np.isfinite(exact_BN)
        first_hop_node_BN = find_first_hops(predecessor_BM, source_B)[:, :num_nodes]
        # Where the first hop sits among the anchor's k neighbours: a (B, N) lookup table.
        slot_of_node_BN = np.zeros((num_anchors, num_nodes), dtype=np.int32)
        np.put_along_axis(slot_of_node_BN, neighbor_host_BK, np.arange(self.k, dtype=np.int32)[None, :], axis=1)
        slot_BN = np.take_along_axis(slot_of_node_BN, first_hop_node_BN, axis=1)
        graph_part_BN = np.where(reachable_BN, exact_BN - np.take_along_axis(edge_host_BK, slot_BN, axis=1), 0.0)

        device = first_hop_BK.device
        slot_BN = torch.from_numpy(slot_BN).to(device).long()
        # Cast on the host (float64 -> the anchors' dtype) so that only that many bytes cross to the device.
        graph_part_BN = torch.from_numpy(graph_part_BN).to(first_hop_BK.dtype).to(device)
        geodesic_BN = first_hop_BK.gather(1, slot_BN) + graph_part_BN
        return geodesic_BN, torch.from_numpy(reachable_BN).to(device)

    def landmark_distances(
        self, first_hop_BK: torch.Tensor, neighbor_BK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An upper bound on d(a, j) through the landmarks, in device tensor ops:

        d(a, l) = min_n [ |a - x_n| + D(l, n) ]  over a's k nearest nodes n,
        d(a, j) ~ min_l [ d(a, l) + D(l, j) ],     and for j among a's k nearest, also |a - x_j|,
        and for j in the local ball of one of a's k nearest n, also |a - x_n| + G(n, j) (exact there).

        The (B, L, n) sums are formed over blocks of nodes to bound memory.
        """
        distance_LN = self.landmark_distance_LN.to(first_hop_BK.dtype)
        num_anchors, num_landmarks = first_hop_BK.shape[0], distance_LN.shape[0]
        # (L, B, K) -> (B, L, K): landmark distances to each anchor's neighbours.
        to_neighbors_BLK = distance_LN[:, neighbor_BK].permute(1, 0, 2)
        anchor_to_landmark_BL = (first_hop_BK[:, None, :] + to_neighbors_BLK).min(dim=2).values
        block = max(1, LANDMARK_BLOCK_ENTRIES // max(1, num_anchors * num_landmarks))
        blocks = []
        for start in range(0, distance_LN.shape[1], block):
            through_BLn = anchor_to_landmark_BL[:, :, None] + distance_LN[None, :, start : start + block]
            blocks.append(through_BLn.min(dim=1).values)
        geodesic_BN = torch.cat(blocks, dim=1)
        geodesic_BN = geodesic_BN.scatter_reduce(1, neighbor_BK, first_hop_BK, reduce="amin", include_self=True)
        if self.ball_index_NM is not None and self.ball_index_NM.shape[1] > 0:
            # Exact at short range: |a - x_n| + G(n, j) for j in the ball of each of a's k nearest n.
            # (B, K) -> (B, K, M) candidate lengths and their nodes, flattened to (B, K * M).
            through_ball_BKM = first_hop_BK[:, :, None] + self.ball_distance_NM[neighbor_BK].to(first_hop_BK.dtype)
            geodesic_BN = geodesic_BN.scatter_reduce(
                1, self.ball_index_NM[neighbor_BK].flatten(1), through_ball_BKM.flatten(1), reduce="amin", include_self=True
            )
        return geodesic_BN, torch.isfinite(geodesic_BN)


def fill_unreachable(geodesic_BN: torch.Tensor, reachable_BN: torch.Tensor) -> torch.Tensor:
    """Unreachable entries -> (largest reachable distance of the row, 0 if none) + 1, detached."""
    reachable_values_BN = torch.where(reachable_BN, geodesic_BN.detach(), torch.zeros_like(geodesic_BN))
    fill_B1 = reachable_values_BN.max(dim=1, keepdim=True).values + 1.0
    return torch.where(reachable_BN, geodesic_BN, fill_B1.expand_as(geodesic_BN))
