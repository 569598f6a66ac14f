"""Cross-modal retrieval Recall@K, the COCO 5-caption protocol: N images, M captions (all of every
image's references), cosine similarity.

- image -> text: an image is a hit at K when one of its own captions ranks within the top K of
  all M captions;
- text -> image: each of the M captions is a query, a hit at K when its image ranks within the
  top K of the N images.

Ties are ranked pessimistically: a candidate that is not the query's match and scores the same as
its best match ranks above it. So a constant embedding, which ties everything, gets R@K = 0 for
every K below the number of wrong candidates, never a perfect score.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Queries scored at a time: bounds the similarity block at 1024 x M doubles (25,000 COCO captions: 200 MB).
QUERY_CHUNK = 1024


def pessimistic_ranks(similarity_QC: torch.Tensor, match_QC: torch.Tensor) -> torch.Tensor:
    """(Q,) 1-based rank of each query's best-scoring match (`match_QC` True) among the C candidates:
    1 + how many non-matching candidates score at least as high (ties count against the query)."""
    best_Q = similarity_QC.masked_fill(~match_QC, float("-inf")).max(dim=1).values
    return 1 + ((similarity_QC >= best_Q[:, None]) & ~match_QC).sum(dim=1)


def rank_of_true_pair(similarity_NN: torch.Tensor) -> torch.Tensor:
    """(N,) `pessimistic_ranks` of each row's true match, the diagonal (one caption per image)."""
    eye_NN = torch.eye(similarity_NN.shape[0], dtype=torch.bool, device=similarity_NN.device)
    return pessimistic_ranks(similarity_NN, eye_NN)


def retrieval_ranks(visual_NE: torch.Tensor, text_ME: torch.Tensor, owner_M: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"image_to_text": (N,) ranks, "text_to_image": (M,) ranks}; caption m belongs to image owner_M[m]."""
    visual_NE = torch.nn.functional.normalize(visual_NE.double(), dim=1)
    text_ME = torch.nn.functional.normalize(text_ME.double(), dim=1)
    owner_M = owner_M.to(visual_NE.device)
    images_N = torch.arange(visual_NE.shape[0], device=visual_NE.device)
    image_ranks = [pessimistic_ranks(visual_NE[start:start + QUERY_CHUNK] @ text_ME.T,
                                     images_N[start:start + QUERY_CHUNK, None] == owner_M[None, :])
                   for start in range(0, visual_NE.shape[0], QUERY_CHUNK)]
    text_ranks = [pessimistic_ranks(text_ME[start:start + QUERY_CHUNK] @ visual_NE.T,
                                    owner_M[start:start + QUERY_CHUNK, None] == images_N[None, :])
                  for start in range(0, text_ME.shape[0], QUERY_CHUNK)]
    return {"image_to_text": torch.cat(image_ranks), "text_to_image": torch.cat(text_ranks)}


def retrieval_recall(visual_NE: torch.Tensor, text_ME: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     owner_M: torch.Tensor | None = None) -> dict[str, float]:
    """R@K in both directions (the module's protocol); without `owner_M`, caption i is image i's only one."""
    if owner_M is None:
        owner_M = torch.arange(text_ME.shape[0])
    ranks = retrieval_ranks(visual_NE, text_ME, owner_M)
    return {f"{direction}_R@{k}": float((rank_Q <= k).double().mean()) for direction, rank_Q in ranks.items() for k in ks}


def retrieval_protocol(images: int, captions: int) -> str:
    """The protocol in words, for the tables."""
    per_image = f"{captions / images:.3g}" if captions % images else str(captions // images)
    return (f"{images} images, {captions} captions (all references, {per_image} per image); image -> text: any of the "
            f"image's captions among all {captions}, text -> image: every caption's image among the {images}; "
            "ties ranked pessimistically")
