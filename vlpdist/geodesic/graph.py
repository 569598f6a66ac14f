"""The k-NN graph as host CSR arrays for scipy.sparse.csgraph, and the first hop of each shortest path.

scipy is an optional extra (`vlpdist[faiss]`): it is imported inside the functions that use it.
Explicit zero weights in a CSR matrix are edges to scipy's csgraph, so duplicate embeddings
(cosine distance 0) stay joined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# scipy's csgraph works in float64 weights and int32 indices; arrays already in those types are not copied.
WEIGHT_DTYPE = np.float64
INDEX_DTYPE = np.int32


@dataclass
class CsrGraph:
    """A directed graph on `num_nodes` nodes stored row-wise: the out-edges of node i are
    indices_E[indptr[i]:indptr[i + 1]] with weights_E at the same positions."""

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    num_nodes: int

    def to_scipy(self):
        from scipy.sparse import csr_matrix

        # Built from arrays already in scipy's dtypes, so scipy keeps them without a copy.
        return csr_matrix((self.weights, self.indices, self.indptr), shape=(self.num_nodes, self.num_nodes))


def build_symmetric_graph(neighbor_NK: np.ndarray, distance_NK: np.ndarray) -> CsrGraph:
    """The undirected k-NN graph, stored with each edge in both directions.

    An edge i -> j of the k-NN lists joins i and j both ways; a pair that is in both lists keeps
    the smaller of its two weights (they differ only by rounding of the two searches).
    """
    num_nodes, k = neighbor_NK.shape
    source_E = np.repeat(np.arange(num_nodes, dtype=np.int64), k)
    target_E = neighbor_NK.reshape(-1).astype(np.int64)
    weight_E = distance_NK.reshape(-1).astype(WEIGHT_DTYPE)
    rows_2E = np.concatenate([source_E, target_E])
    cols_2E = np.concatenate([target_E, source_E])
    weight_2E = np.concatenate([weight_E, weight_E])
    # One int64 key per (row, col): sorting it orders edges row by row, columns ascending.
    key_2E = rows_2E * num_nodes + cols_2E
    order_2E = np.argsort(key_2E, kind="stable")
    key_sorted_2E = key_2E[order_2E]
    unique_key_U, first_of_key_U = np.unique(key_sorted_2E, return_index=True)
    weight_U = np.minimum.reduceat(weight_2E[order_2E], first_of_key_U)
    rows_U = unique_key_U // num_nodes
    indptr_N1 = np.zeros(num_nodes + 1, dtype=INDEX_DTYPE)
    np.cumsum(np.bincount(rows_U, minlength=num_nodes), out=indptr_N1[1:])
    indices_U = (unique_key_U % num_nodes).astype(INDEX_DTYPE)
    return CsrGraph(indptr_N1, indices_U, weight_U, num_nodes)


class AnchorGraphBuffer:
    """The snapshot graph plus B source-only anchor rows, in arrays reused from call to call.

    Rows 0..N-1 are the snapshot graph, copied into the buffer once; rows N..N+B-1 hold each
    anchor's out-edges to its k nearest nodes. Anchors get no in-edges, so a shortest path can
    start at an anchor but never pass through one. Each call writes only the anchor rows.
    """

    def __init__(self, graph: CsrGraph):
        self.graph = graph
        self.capacity_anchors = 0
        self.capacity_edges = 0
        self.indptr = self.indices = self.weights = None

    def with_anchors(self, neighbor_BK: np.ndarray, distance_BK: np.ndarray):
        """The augmented graph (N + B nodes) as a scipy CSR matrix viewing the buffer."""
        graph = self.graph
        num_anchors, k = neighbor_BK.shape
        base_edges = graph.indices.shape[0]
        total_edges = base_edges + num_anchors * k
        if num_anchors > self.capacity_anchors or total_edges > self.capacity_edges:
            self.grow(num_anchors, k)
        self.indptr[graph.num_nodes + 1 : graph.num_nodes + num_anchors + 1] = base_edges + k * np.arange(
            1, num_anchors + 1, dtype=INDEX_DTYPE
        )
        self.indices[base_edges:total_edges] = neighbor_BK.reshape(-1)
        self.weights[base_edges:total_edges] = distance_BK.reshape(-1)
        from scipy.sparse import csr_matrix

        size = graph.num_nodes + num_anchors
        return csr_matrix(
            (self.weights[:total_edges], self.indices[:total_edges], self.indptr[: size + 1]), shape=(size, size)
        )

    def grow(self, num_anchors: int, k: int) -> None:
        graph = self.graph
        base_edges = graph.indices.shape[0]
        self.capacity_anchors = num_anchors
        self.capacity_edges = base_edges + num_anchors * k
        self.indptr = np.empty(graph.num_nodes + num_anchors + 1, dtype=INDEX_DTYPE)
        self.indices = np.empty(self.capacity_edges, dtype=INDEX_DTYPE)
        self.weights = np.empty(self.capacity_edges, dtype=WEIGHT_DTYPE)
        self.indptr[: graph.num_nodes + 1] = graph.indptr
        self.indices[:base_edges] = graph.indices
        self.weights[:base_edges] = graph.weights


def find_first_hops(predecessor_BM: np.ndarray, source_B: np.ndarray) -> np.ndarray:
    """(B, M) int64: for row b, the node right after source_B[b] on the shortest path to each node.

    predecessor_BM is scipy dijkstra's predecessor matrix (-9999 where there is none). Each node
    points to its predecessor, except that the source's direct successors point to themselves;
    pointer jumping (hop <- hop[hop]) then halves every path per round, so after about
    log2(longest path) rounds each node points at its path's first hop. Unreached nodes and the
    source point to themselves throughout; the caller masks them.
    """
    column_1M = np.arange(predecessor_BM.shape[1], dtype=np.int64)[None, :]
    predecessor_BM = predecessor_BM.astype(np.int64)
    is_root_BM = (predecessor_BM == source_B[:, None]) | (predecessor_BM < 0)
    hop_BM = np.where(is_root_BM, column_1M, predecessor_BM)
    while True:
        jumped_BM = np.take_along_axis(hop_BM, hop_BM, axis=1)
        if np.array_equal(jumped_BM, hop_BM):
            return hop_BM
        hop_BM = jumped_BM


def pick_landmarks(
    graph: CsrGraph, num_landmarks: int, num_components: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(landmark_L int64, landmark_distance_LN float64, inf outside the landmark's component), farthest-point sampled.

    The first landmark is a seeded random node; each next one is the node farthest (in graph
    distance) from all landmarks so far. A node no landmark reaches is infinitely far, so every
    connected component gets a landmark before any component gets a second one: L is
    max(num_landmarks, num_components), at most N.
    """
    from scipy.sparse.csgraph import dijkstra

    matrix = graph.to_scipy()
    total = min(max(num_landmarks, num_components), graph.num_nodes)
    landmarks = [int(np.random.default_rng(seed).integers(graph.num_nodes))]
    rows = []
    nearest_landmark_N = np.full(graph.num_nodes, np.inf)
    while True:
        distance_N = dijkstra(matrix, directed=True, indices=landmarks[-1])
        rows.append(distance_N)
        nearest_landmark_N = np.minimum(nearest_landmark_N, distance_N)
        if len(landmarks) == total:
            return np.asarray(landmarks, dtype=np.int64), np.stack(rows)
        landmarks.append(int(np.argmax(nearest_landmark_N)))


# Sources per truncated-Dijkstra call of `local_balls`: scipy returns a dense (sources, N) float64 block,
# so 256 sources at 65,536 nodes are 128 MiB.
BALL_SOURCES_PER_CALL = 256


def local_balls(graph: CsrGraph, radius: float, max_nodes: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ball_index_NM int64, ball_distance_NM float32, stats): each node's exact graph distances to the nodes
    within `radius` of it (itself included, at 0), the `max_nodes` nearest where more are that close,
    padded with index 0 at distance inf. M is the largest ball kept (at most max_nodes).

    Why: a landmark bound is loose at short range (a path through a landmark detours unless a landmark
    sits near it; measured by launcher.geodesic_stretch), and short range is where the false-negative
    radius, the limit and the hard-negative picks act. With these balls, any pair whose shortest path
    from the anchor's first hop n is at most `radius` long is answered exactly: G(n, j) <= radius puts
    j in n's ball (unless the ball was capped; stats["ball_capped_fraction"] says how often).
    """
    from scipy.sparse.csgraph import dijkstra

    matrix = graph.to_scipy()
    index_blocks, distance_blocks, counts = [], [], []
    for start in range(0, graph.num_nodes, BALL_SOURCES_PER_CALL):
        sources_c = np.arange(start, min(start + BALL_SOURCES_PER_CALL, graph.num_nodes))
        distance_cN = dijkstra(matrix, directed=True, indices=sources_c, limit=radius)
        rows_F, cols_F = np.nonzero(np.isfinite(distance_cN))  # row-major: grouped by source
        values_F = distance_cN[rows_F, cols_F]
        # Within each source, nearest first; then the rank of each entry inside its source's run.
        order_F = np.lexsort((values_F, rows_F))
        rows_F, cols_F, values_F = rows_F[order_F], cols_F[order_F], values_F[order_F]
        count_c = np.bincount(rows_F, minlength=sources_c.shape[0])
        first_c = np.concatenate([[0], np.cumsum(count_c)[:-1]])
        rank_F = np.arange(rows_F.shape[0]) - first_c[rows_F]
        keep_F = rank_F < max_nodes
        width = int(min(max_nodes, count_c.max(initial=1)))
        index_cM = np.zeros((sources_c.shape[0], width), dtype=np.int64)
        ball_cM = np.full((sources_c.shape[0], width), np.inf, dtype=np.float32)
        index_cM[rows_F[keep_F], rank_F[keep_F]] = cols_F[keep_F]
        ball_cM[rows_F[keep_F], rank_F[keep_F]] = values_F[keep_F]
        index_blocks.append(index_cM)
        distance_blocks.append(ball_cM)
        counts.append(count_c)
    width = max(block.shape[1] for block in index_blocks)
    ball_index_NM = np.zeros((graph.num_nodes, width), dtype=np.int64)
    ball_distance_NM = np.full((graph.num_nodes, width), np.inf, dtype=np.float32)
    row = 0
    for index_cM, ball_cM in zip(index_blocks, distance_blocks):
        ball_index_NM[row : row + index_cM.shape[0], : index_cM.shape[1]] = index_cM
        ball_distance_NM[row : row + index_cM.shape[0], : ball_cM.shape[1]] = ball_cM
        row += index_cM.shape[0]
    count_N = np.concatenate(counts)
    stats = {"ball_mean_nodes": float(np.minimum(count_N, max_nodes).mean()), "ball_width": width,
             "ball_capped_fraction": float((count_N > max_nodes).mean())}
    return ball_index_NM, ball_distance_NM, stats
