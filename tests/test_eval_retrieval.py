"""Retrieval R@K on embeddings built with known ranks."""

from __future__ import annotations

import torch

from vlpdist.eval.retrieval import rank_of_true_pair, retrieval_recall


def test_recall_at_k_on_embeddings_with_known_ranks():
    # 12 pairs on orthonormal directions. Caption i is image i's own direction mixed with a
    # decoy: image i's true caption ranks (i % 4) + 1 among all captions, by construction.
    n = 12
    basis = torch.eye(n)
    visual = basis.clone()
    text = torch.zeros(n, n)
    expected_rank = torch.tensor([(i % 4) + 1 for i in range(n)])
    for i in range(n):
        text[i] = basis[i]
    similarity = visual @ text.T
    # Rows of the similarity: put (rank - 1) decoy captions above the true one.
    for i in range(n):
        decoys = [(i + 1 + j) % n for j in range(int(expected_rank[i]) - 1)]
        for d in decoys:
            similarity[i, d] = 2.0
    assert torch.equal(rank_of_true_pair(similarity), expected_rank)

    # Through embeddings: image i looks like captions i (weight 1) and (i+1..i+r-1) (weight 2) in a space
    # where every caption is a unit basis vector, so the true caption ranks exactly r.
    visual = torch.zeros(n, n)
    for i in range(n):
        visual[i, i] = 1.0
        for j in range(int(expected_rank[i]) - 1):
            visual[i, (i + 1 + j) % n] = 2.0
    recall = retrieval_recall(visual, text, ks=(1, 2, 5))
    assert recall["image_to_text_R@1"] == 3 / 12  # ranks 1 at i = 0, 4, 8
    assert recall["image_to_text_R@2"] == 6 / 12
    assert recall["image_to_text_R@5"] == 1.0
    # Text -> image: caption c is most similar to the images that put weight 2 on it; computed by hand for c = 0.
    ranks_t2i = rank_of_true_pair((torch.nn.functional.normalize(visual, dim=1) @ text.T).T)
    similarity_c0 = torch.nn.functional.normalize(visual, dim=1)[:, 0]
    assert int(ranks_t2i[0]) == 1 + int((similarity_c0 > similarity_c0[0]).sum())
    assert recall["text_to_image_R@1"] == float((ranks_t2i <= 1).double().mean())


def test_perfect_and_reversed_alignment():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(20, 8, generator=generator), dim=1)
    perfect = retrieval_recall(embeddings, embeddings)
    assert perfect["image_to_text_R@1"] == 1.0 and perfect["text_to_image_R@1"] == 1.0
    opposite = retrieval_recall(embeddings, -embeddings)
    assert opposite["image_to_text_R@1"] == 0.0 and opposite["image_to_text_R@10"] < 1.0
