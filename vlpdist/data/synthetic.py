"""Synthetic feature shards in the contract format, for tests and benchmarks without CLIP.

Captions come from a small grammar (colour, shape, position). The "image" embedding is the
normalised sum of fixed random word vectors of the caption's words plus noise, so a mapper can
learn to caption it and held-out loss can beat the no-image baseline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)


def synthetic_captions(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        f"a {COLOURS[rng.integers(len(COLOURS))]} {SHAPES[rng.integers(len(SHAPES))]} {PLACES[rng.integers(len(PLACES))]}"
        for _ in range(count)
    ]


def write_synthetic_feature_shards(
    folder: str | Path,
    num_shards: int,
    samples_per_shard: int | list[int],
    dim: int = 32,
    seed: int = 0,
    nan_keys: frozenset[str] = frozenset(),
    repeat_first: bool = False,
) -> list[Path]:
    """Write `num_shards` feature shards of `samples_per_shard` samples each (or, given a list, of
    `samples_per_shard[i]` in shard i), each with the processing stage's `<shard>_stats.json`
    beside it; `nan_keys` get NaN embeddings.

    `repeat_first` makes every sample a copy of the first (same caption and embedding), so every
    batch is the same fixed batch."""
    import webdataset as wds

    from vlpdist.data.feature_format import encode_feature_sample

    from vlpdist.atomic import atomic_write_json
    from vlpdist.data.feature_format import write_label_vocabulary
    from vlpdist.data.feature_shards import STATS_SUFFIX

    sizes = [samples_per_shard] * num_shards if isinstance(samples_per_shard, int) else list(samples_per_shard)
    if len(sizes) != num_shards:
        raise ValueError(f"{len(sizes)} shard sizes given for {num_shards} shards")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_label_vocabulary(folder, list(SHAPES))
    rng = np.random.default_rng(seed)
    vocabulary = sorted({word for phrase in ["a"] + COLOURS + SHAPES + PLACES for word in phrase.split()})
    word_vectors = {word: rng.standard_normal(dim) for word in vocabulary}
    captions = synthetic_captions(sum(sizes), seed + 1)
    if repeat_first:
        captions = captions[:1] * len(captions)
    paths = []
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(sizes[shard]):
                key = f"{shard:05d}{index:04d}"
                caption = captions[sum(sizes[:shard]) + index]
                words = caption.split()
                noise = rng.standard_normal(dim)
                if repeat_first:
                    noise = np.random.default_rng(seed).standard_normal(dim)
                image = _unit(sum(word_vectors[word] for word in words) + 0.3 * noise)
                if key in nan_keys:
                    image = np.full(dim, np.nan)
                text = _unit(sum(word_vectors[word] for word in words))[None, :]
                writer.write(
                    encode_feature_sample(
                        key=key,
                        image_embedding=image,
                        text_embeddings=text,
                        captions=[caption],
                        labels=[SHAPES.index(words[2])],
                        label_names=[words[2]],
                        scores={},
                        decision="kept",
                        url=f"http://127.0.0.1/{key}.jpg",
                        original_caption=caption,
                    )
                )
        atomic_write_json(folder / f"{path.stem}{STATS_SUFFIX}", {"shard": path.stem, "written": sizes[shard]})
        paths.append(path)
    return paths
