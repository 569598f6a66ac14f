"""Retrieval R@K on embeddings built with known ranks."""

from __future__ import annotations

import torch

from vlpdist.eval.retrieval import rank_of_true_pair, retrieval_protocol, retrieval_ranks, retrieval_recall


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


def test_constant_embeddings_rank_pessimistically():
    # Every similarity ties: each true match ranks below all N - 1 wrong candidates, rank N, so
    # R@K = 0 below K = N and 1 from there (never the 100 % a tie in the query's favour gave).
    n = 12
    constant = torch.ones(n, 8)
    assert torch.equal(rank_of_true_pair(constant @ constant.T), torch.full((n,), n))
    recall = retrieval_recall(constant, constant, ks=(1, 5, 12))
    assert recall == {f"{d}_R@{k}": (1.0 if k == n else 0.0) for d in ("image_to_text", "text_to_image") for k in (1, 5, 12)}


def test_every_reference_of_an_image_counts_in_both_directions():
    # 3 images on the axes e0, e1, e2; image 0 has captions e0 and (e1 + e2), image 1 has e1, image 2 has
    # (e0 + e1) and e2: 5 captions. Worked by hand, ties against the query.
    visual = torch.eye(3)
    root = 2 ** -0.5
    text = torch.tensor([[1, 0, 0], [0, root, root], [0, 1, 0], [root, root, 0], [0, 0, 1]])
    owner = torch.tensor([0, 0, 1, 2, 2])
    ranks = retrieval_ranks(visual, text, owner)
    # Image 0: its best caption e0 scores 1; no other caption scores >= 1: rank 1. Image 1: its e1 scores 1,
    # alone: rank 1. Image 2: e2 scores 1, alone: rank 1.
    assert ranks["image_to_text"].tolist() == [1, 1, 1]
    # Caption e1+e2 (image 0) scores 0 with image 0 and 0.707 with images 1 and 2: rank 3. Caption e0+e1
    # (image 2) scores 0 with image 2, 0.707 with images 0 and 1: rank 3. The three axis captions rank 1.
    assert ranks["text_to_image"].tolist() == [1, 3, 1, 3, 1]
    recall = retrieval_recall(visual, text, ks=(1, 2), owner_M=owner)
    assert recall["image_to_text_R@1"] == 1.0 and recall["text_to_image_R@1"] == 3 / 5 and recall["text_to_image_R@2"] == 3 / 5
    assert retrieval_protocol(3, 5) == ("3 images, 5 captions (all references, 1.67 per image); image -> text: any of the "
                                        "image's captions among all 5, text -> image: every caption's image among the 3; "
                                        "ties ranked pessimistically")


def test_score_retrieval_takes_every_reference():
    from vlpdist.eval.scoring import score_retrieval

    visual = torch.eye(3)
    embeddings = {"a": (visual[0], torch.stack([visual[0], visual[1]])), "b": (visual[1], visual[1][None]),
                  "c": (visual[2], visual[2][None])}
    scored, protocol = score_retrieval(embeddings)
    # Image b's own caption ties image a's second one (both e1): against b, which ranks it 2nd of the 4 captions.
    assert scored["image_to_text_R@1"] == 2 / 3 and scored["text_to_image_R@1"] == 3 / 4
    assert protocol.startswith("3 images, 4 captions (all references, 1.33 per image)")
