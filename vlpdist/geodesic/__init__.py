"""Approximate geodesics over the memory bank: a k-NN graph (torch or FAISS) and shortest paths from anchors (scipy).

`knn` finds neighbours, `graph` holds the host CSR graph and its path helpers, `snapshot`
builds the refreshed graph and answers each step's anchor -> node distances.
"""

from vlpdist.geodesic.knn import BACKENDS, KnnIndex, build_knn, build_knn_index, search_knn
from vlpdist.geodesic.snapshot import METHODS, GeodesicSnapshot

__all__ = ["BACKENDS", "METHODS", "GeodesicSnapshot", "KnnIndex", "build_knn", "build_knn_index", "search_knn"]
