"""Retrieval examples for the report: for a few held-out images, the top-k of all references by
cosine in the evaluation's retrieval embeddings, the image's own captions marked."""

from __future__ import annotations

import torch

EXAMPLE_IMAGES = 4


def retrieval_examples(embeddings: dict, references: dict[str, list[str]], images: int = EXAMPLE_IMAGES, k: int = 5) -> list[dict]:
    """[{key, top: [{caption, true, score}]}] for the first `images` keys (in key order) with references.
    `embeddings[key]` is (visual_E, text_RE): the image's embedding and one per reference."""
    keys = [key for key in sorted(references) if references[key] and key in embeddings]
    if not keys:
        return []
    captions = [caption for key in keys for caption in references[key]]
    owner_M = [key for key in keys for _ in references[key]]
    text_ME = torch.nn.functional.normalize(torch.cat([torch.as_tensor(embeddings[key][1]).float().reshape(len(references[key]), -1)
                                                       for key in keys]), dim=1)
    out = []
    for key in keys[:images]:
        visual_E = torch.nn.functional.normalize(torch.as_tensor(embeddings[key][0]).float().reshape(-1), dim=0)
        scores_M = text_ME @ visual_E
        top = torch.topk(scores_M, min(k, len(captions)))
        out.append({"key": key, "top": [{"caption": captions[m], "true": owner_M[m] == key, "score": float(s)}
                                        for s, m in zip(top.values.tolist(), top.indices.tolist())]})
    return out
