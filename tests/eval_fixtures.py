"""A feature shard as the processing stage writes it with the BLIP captioner on: web captions the
filter kept first, then the synthetic ones it kept, each sample marked with its CapFilt decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (key, the web captions CapFilt kept, the synthetic captions it kept), in the order the processing stage writes them.
CAPFILT_SAMPLES = [
    ("w", ["a red circle on the left"], []),
    ("ws", ["a blue square at the top"], ["a picture of a shape", "a drawing of a blue shape"]),
    ("s", [], ["a photo of a green star"]),
]
CAPFILT_DECISIONS = {"w": "keep_web", "ws": "keep_web_and_synthetic", "s": "keep_synthetic"}


def capfilt_shard(path: Path, dim: int = 32) -> Path:
    """`CAPFILT_SAMPLES` as a feature shard at `path`, random unit-free embeddings of width `dim`."""
    import webdataset as wds

    from vlpdist.data.feature_format import encode_feature_sample

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for key, web, synthetic in CAPFILT_SAMPLES:
            captions = web + synthetic
            writer.write(encode_feature_sample(
                key=key, image_embedding=rng.standard_normal(dim), text_embeddings=rng.standard_normal((len(captions), dim)),
                captions=captions, labels=[], label_names=[], scores={"synthetic_captions": synthetic},
                decision=CAPFILT_DECISIONS[key], url="", original_caption=(web or ["a web caption the filter dropped"])[0]))
    return path
