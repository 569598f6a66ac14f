"""The feature shard contract: encode -> TarWriter -> stream back (local path and `pipe:`)."""

from __future__ import annotations

import numpy as np
import pytest

from vlpdist.data.feature_format import (
    decode_feature_sample,
    encode_feature_sample,
    iterate_feature_shards,
)


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _write_shard(path, n: int, dim: int = 16) -> list[dict]:
    import webdataset as wds

    rng = np.random.default_rng(0)
    written = []
    with wds.TarWriter(str(path)) as sink:
        for index in range(n):
            n_captions = 1 + index % 3
            sample = encode_feature_sample(
                key=f"{index:09d}",
                image_embedding=_unit(rng, dim),
                text_embeddings=_unit(rng, n_captions, dim),
                captions=[f"caption {index} {c}" for c in range(n_captions)],
                labels=[3, 1, 3],
                label_names=["circle", "square"],
                scores={"clip_score": 0.5},
                decision="keep_web",
                url=f"http://x/{index}.jpg",
                original_caption=f"web {index}",
            )
            sink.write(sample)
            written.append(sample)
    return written


@pytest.mark.parametrize("via_pipe", [False, True])
def test_roundtrip_through_tar(tmp_path, via_pipe):
    shard = tmp_path / "00000.tar"
    written = _write_shard(shard, 5)
    url = f"pipe:cat {shard}" if via_pipe else str(shard)
    samples = list(iterate_feature_shards(url))
    assert [s.key for s in samples] == [w["__key__"] for w in written]
    for index, sample in enumerate(samples):
        assert sample.image_embedding.dtype == np.float16 and sample.image_embedding.shape == (16,)
        assert sample.text_embeddings.shape == (1 + index % 3, 16)
        assert len(sample.captions) == sample.text_embeddings.shape[0]
        assert sample.labels == [1, 3]
        assert np.allclose(np.linalg.norm(sample.image_embedding.astype(np.float32)), 1.0, atol=1e-2)
        assert sample.source_key == sample.key and sample.original_caption == f"web {index}"


def test_decode_accepts_webdataset_decoded_values(tmp_path):
    import webdataset as wds

    shard = tmp_path / "00000.tar"
    _write_shard(shard, 2)
    decoded = list(wds.WebDataset(str(shard), shardshuffle=False).decode())
    sample = decode_feature_sample(decoded[1])
    assert sample.text_embeddings.shape == (2, 16) and sample.decision == "keep_web"


def test_encode_rejects_mismatched_captions():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        encode_feature_sample("k", _unit(rng, 8), _unit(rng, 2, 8), ["only one"], [], [], {}, "keep", "", "")
    with pytest.raises(ValueError):
        encode_feature_sample("k", _unit(rng, 8), np.zeros((0, 8)), [], [], [], {}, "keep", "", "")


def test_stream_over_http_from_a_loopback_server(tmp_path):
    """Feature shards stream from a URL as from a local path (webdataset's gopen over HTTP)."""
    import functools
    import http.server
    import threading

    _write_shard(tmp_path / "00000.tar", 3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        samples = list(iterate_feature_shards(f"http://127.0.0.1:{server.server_address[1]}/00000.tar"))
    finally:
        server.shutdown()
        server.server_close()
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
