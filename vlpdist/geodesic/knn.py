"""k nearest neighbours of unit-norm embeddings by cosine distance (1 - cos), brute force in torch or through FAISS.

Embeddings are unit-norm, so the largest inner products are the smallest cosine distances and
every backend searches by inner product. FAISS is an optional extra (`vlpdist[faiss]`): it is
imported inside the functions that use it.

FAISS runs on the GPU when `faiss.get_num_gpus() > 0` and the nodes sit on a CUDA device (flat
and IVF indexes; FAISS has no GPU HNSW, so HNSW stays on the host). FAISS takes host arrays, so
nodes and queries are copied to the host for it and the results copied back to the nodes' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "faiss_flat", "faiss_ivf", "faiss_hnsw")
# Brute-force similarity blocks (rows x N float32) stay under a byte budget, whatever N is: 256 MiB on
# the CPU; on a GPU an eighth of its free memory, at most 8 GiB, so that 1M nodes are searched in a few
# hundred blocks of 2,048 rows (large GEMMs) rather than 16,384 blocks of 64 rows (tiny GEMM + top-k launches).
SIMILARITY_BLOCK_BYTES_CPU = 1 << 28
SIMILARITY_BLOCK_BYTES_GPU_MAX = 1 << 33
# FAISS advises 30..256 training points per IVF list; fewer lists than N / 39 avoids its warning.
IVF_MIN_POINTS_PER_LIST = 39


@dataclass
class KnnIndex:
    """What a search against the built nodes needs: the nodes themselves (torch) or the FAISS index over them.

    gpu_resources: FAISS's GPU memory and streams behind a GPU index, held here so that they live as long as it.
    """

    backend: str
    nodes_ND: torch.Tensor
    faiss_index: object | None = None
    gpu_resources: object | None = None


def default_ivf_lists(num_nodes: int) -> int:
    """FAISS's rule of thumb, 4 * sqrt(N) lists, capped so that each list gets enough training points."""
    return max(1, min(int(4 * math.sqrt(num_nodes)), num_nodes // IVF_MIN_POINTS_PER_LIST))


def build_knn_index(
    nodes_ND: torch.Tensor,
    backend: str = "torch",
    *,
    ivf_lists: int = 0,
    ivf_probes: int = 0,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 0,
    seed: int = 0,
) -> KnnIndex:
    """Index the unit-norm nodes for inner-product search.

    ivf_lists: IVF lists (0: `default_ivf_lists(N)`); ivf_probes: lists visited per query
    (0: 1/32 of them, at least 1, which kept recall@10 at 0.999 on the benchmark's clustered
    embeddings at 16k x 256; `ivf_probes == ivf_lists` makes IVF exact). hnsw_m: graph
    degree of HNSW; hnsw_ef_search: its search beam (0: 128). seed: IVF's k-means seed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"k-NN backend {backend!r}; choose one of {BACKENDS}")
    if nodes_ND.dim() != 2:
        raise ValueError(f"k-NN nodes of shape {tuple(nodes_ND.shape)}; expected (N, D)")
    nodes_ND = nodes_ND.detach().float().contiguous()
    if backend == "torch":
        return KnnIndex(backend, nodes_ND)

    import faiss

    num_nodes, dim = nodes_ND.shape
    if backend == "faiss_flat":
        index = faiss.IndexFlatIP(dim)
    elif backend == "faiss_ivf":
        lists = ivf_lists or default_ivf_lists(num_nodes)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.nprobe = ivf_probes or max(1, lists // 32)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = hnsw_ef_search or 128
    gpu_resources = None
    if backend != "faiss_hnsw" and nodes_ND.is_cuda and faiss.get_num_gpus() > 0:
        gpu_resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(gpu_resources, nodes_ND.device.index or 0, index)
    nodes_host_ND = nodes_ND.cpu().numpy()
    if not index.is_trained:
        index.train(nodes_host_ND)
    index.add(nodes_host_ND)
    return KnnIndex(backend, nodes_ND, index, gpu_resources)


def search_knn(
    index: KnnIndex, queries_QD: torch.Tensor, k: int, *, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbor_index_QK int64, cosine_distance_QK float32) of each query's k nearest built nodes, nearest first,
    on the nodes' device. No gradient flows: callers recompute 1 - q.x_n from the indices where they need one.

    exclude_self: the queries are the built nodes themselves (row q is node q); node q is left out of
    row q. The search asks for k + 1 and drops node q, or the farthest of the k + 1 where an
    approximate index (or an exact duplicate of q) did not return q.
    """
    num_nodes = index.nodes_ND.shape[0]
    wanted = k + 1 if exclude_self else k
    if wanted > num_nodes:
        raise ValueError(f"k-NN search for {wanted} neighbours among {num_nodes} nodes")
    queries_QD = queries_QD.detach().float().to(index.nodes_ND.device)
    if index.backend == "torch":
        similarity_QW, neighbor_QW = search_brute_force(index.nodes_ND, queries_QD, wanted)
    else:
        similarity_host_QW, neighbor_host_QW = index.faiss_index.search(queries_QD.cpu().numpy(), wanted)
        similarity_QW = torch.from_numpy(similarity_host_QW).to(index.nodes_ND.device)
        neighbor_QW = torch.from_numpy(neighbor_host_QW).to(index.nodes_ND.device)
        if (neighbor_QW < 0).any():
            # FAISS pads with -1 when the probed IVF lists hold fewer than `wanted` nodes.
            raise ValueError(f"{index.backend} found fewer than {wanted} neighbours for some queries: probe more lists")
    if exclude_self:
        neighbor_QW, similarity_QW = drop_self(neighbor_QW, similarity_QW)
    # Rounding can push 1 - cos of a near-duplicate just below 0; shortest paths need weights >= 0.
    distance_QK = (1.0 - similarity_QW).clamp_min(0.0)
    return neighbor_QW.to(torch.int64), distance_QK.float()


def similarity_block_rows(num_nodes: int, device: torch.device) -> int:
    """Query rows per brute-force block: as many as keep a rows x `num_nodes` float32 block within the device's budget."""
    budget = SIMILARITY_BLOCK_BYTES_CPU
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(free_bytes // 8, SIMILARITY_BLOCK_BYTES_GPU_MAX)
    return max(1, budget // (4 * num_nodes))


def search_brute_force(nodes_ND: torch.Tensor, queries_QD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity_QK, neighbor_QK): top-k inner products in blocks of queries, never a Q x N matrix at once."""
    num_nodes = nodes_ND.shape[0]
    block = similarity_block_rows(num_nodes, nodes_ND.device)
    similarities, neighbors = [], []
    for start in range(0, queries_QD.shape[0], block):
        similarity_bN = queries_QD[start : start + block] @ nodes_ND.T
        top = similarity_bN.topk(k, dim=1)
        similarities.append(top.values)
        neighbors.append(top.indices)
    return torch.cat(similarities), torch.cat(neighbors)


def drop_self(neighbor_NW: torch.Tensor, similarity_NW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop node n from row n of (N, k + 1) results, or the last column of the rows that lack it -> (N, k)."""
    rows, wanted = neighbor_NW.shape
    row_N1 = torch.arange(rows, device=neighbor_NW.device)[:, None]
    drop_NW = neighbor_NW == row_N1
    drop_NW[:, -1] |= ~drop_NW.any(dim=1)
    keep_NW = ~drop_NW
    return neighbor_NW[keep_NW].view(rows, wanted - 1), similarity_NW[keep_NW].view(rows, wanted - 1)


def build_knn(
    nodes_ND: torch.Tensor, k: int, backend: str = "torch", *, ivf_lists: int = 0, hnsw_m: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbor_index_NK int64, cosine_distance_NK float32) of each node's k nearest other nodes, on the nodes' device.

    backend: torch (brute force in blocks on the nodes' device), faiss_flat (IndexFlatIP, exact),
    faiss_ivf (IndexIVFFlat, inner product), faiss_hnsw (IndexHNSWFlat, inner product). To search
    more points against the same index later, call `build_knn_index` and `search_knn` instead.
    """
    index = build_knn_index(nodes_ND, backend, ivf_lists=ivf_lists, hnsw_m=hnsw_m, seed=seed)
    return search_knn(index, nodes_ND, k, exclude_self=True)
