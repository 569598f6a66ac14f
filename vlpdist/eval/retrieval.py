"""Cross-modal retrieval Recall@K over paired embeddings (sample i's image with sample i's caption)."""

from __future__ import annotations

from typing import Sequence

import torch


def rank_of_true_pair(similarity_NN: torch.Tensor) -> torch.Tensor:
    """(N,) 1-based rank of each row's true match (the diagonal): 1 + how many candidates score strictly
    higher. Ties count in the query's favour, so a constant similarity gives rank 1 for all; use
    embeddings that are not all equal when that matters."""
    true_N = similarity_NN.diagonal()
    return 1 + (similarity_NN > true_N[:, None]).sum(dim=1)


def retrieval_recall(visual_NE: torch.Tensor, text_NE: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in both directions for N pairs of unit-norm (or any) embeddings, cosine similarity:
    image->text (each image's own caption among the N captions) and text->image."""
    visual_NE = torch.nn.functional.normalize(visual_NE.double(), dim=1)
    text_NE = torch.nn.functional.normalize(text_NE.double(), dim=1)
    similarity_NN = visual_NE @ text_NE.T
    ranks = {"image_to_text": rank_of_true_pair(similarity_NN), "text_to_image": rank_of_true_pair(similarity_NN.T)}
    return {f"{direction}_R@{k}": float((rank_N <= k).double().mean()) for direction, rank_N in ranks.items() for k in ks}
