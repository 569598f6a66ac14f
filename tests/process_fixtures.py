"""Small real inputs for the processing tests: a tiny open_clip checkpoint, tiny BLIP models, raw shards."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = "vlpdist-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(folder: Path) -> Path:
    """A randomly initialised tiny open_clip model saved as a checkpoint with its config beside it."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{TINY_CLIP}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    checkpoint = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


BLIP_WORDS = ["a", "the", "red", "blue", "green", "circle", "square", "star", "triangle", "diamond", "dog", "cat",
              "picture", "of", "left", "right", "and", "on", "with", "photo"]


def save_tiny_blip(folder: Path) -> Path:
    """Tiny random BLIP captioner + ITM weights and a local BERT word-piece tokenizer, in one folder."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(special + BLIP_WORDS) + "\n")
    # Positional: `vocab_file` in transformers 4, `vocab` (a path or dict) in 5.
    tokenizer = BertTokenizerFast(str(vocab_file), do_lower_case=True, bos_token="[DEC]")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vocab_size = len(special) + len(BLIP_WORDS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    config = BlipConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": ids["[DEC]"], "pad_token_id": ids["[PAD]"], "sep_token_id": ids["[SEP]"],
            "eos_token_id": ids["[SEP]"],
        },
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    captioner_dir, itm_dir = folder / "captioner", folder / "itm"
    for model_class, target in ((BlipForConditionalGeneration, captioner_dir), (BlipForImageTextRetrieval, itm_dir)):
        model_class(config).save_pretrained(target)
        processor.save_pretrained(target)
    return folder


def write_raw_shards(root: Path, num_samples: int, per_shard: int) -> list[Path]:
    """img2dataset-shaped raw shards (tar + parquet) from the demo's synthetic generator (seed 0).

    The URLs point at a closed loopback port: the images are in the shards, nothing fetches them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from data_ingest.sources.synthetic import generate_demo_samples
    from vlpdist.config import DemoDataConfig

    samples = generate_demo_samples(DemoDataConfig(num_samples=num_samples, seed=0, image_size=32))
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard_index, start in enumerate(range(0, num_samples, per_shard)):
        tar_path = raw / f"{shard_index:05d}.tar"
        rows = {"key": [], "status": [], "url": [], "caption": []}
        with wds.TarWriter(str(tar_path)) as sink:
            for index in range(start, min(start + per_shard, num_samples)):
                sample = samples[index]
                key = f"{shard_index:05d}{index - start:04d}"
                url = f"http://127.0.0.1:1/{sample.path}"
                sink.write({"__key__": key, "jpg": sample.jpeg, "txt": sample.caption.encode(),
                            "json": json.dumps({"key": key, "url": url, "caption": sample.caption}).encode()})
                for column, value in zip(rows, (key, "success", url, sample.caption)):
                    rows[column].append(value)
        pq.write_table(pa.table(rows), tar_path.with_suffix(".parquet"))
        shards.append(tar_path)
    return shards


def write_repeated_raw_shard(root: Path, num_samples: int, image_size: int, distinct: int = 16) -> Path:
    """One img2dataset-shaped raw shard (tar + parquet) of `num_samples` samples, fast to build at any size:
    `distinct` random-noise JPEGs (noise, so every image decodes to its full size) and demo-like captions, repeated."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(distinct):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, "JPEG")
        jpegs.append(buffer.getvalue())
    shapes, colours = ["circle", "square", "triangle", "star"], ["red", "blue", "green", "yellow"]
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    tar_path = raw / "00000.tar"
    rows = {"key": [], "status": [], "url": [], "caption": []}
    with wds.TarWriter(str(tar_path)) as sink:
        for index in range(num_samples):
            key, url = f"00000{index:05d}", f"http://127.0.0.1:1/img/{index:06d}.jpg"
            caption = f"a {colours[index % 4]} {shapes[(index // 4) % 4]} on the {('left', 'right')[index % 2]}"
            sink.write({"__key__": key, "jpg": jpegs[index % distinct], "txt": caption.encode(),
                        "json": json.dumps({"key": key, "url": url, "caption": caption}).encode()})
            for column, value in zip(rows, (key, "success", url, caption)):
                rows[column].append(value)
    pq.write_table(pa.table(rows), tar_path.with_suffix(".parquet"))
    return tar_path


def replace_tar_member(tar_path: Path, name: str, data: bytes) -> None:
    """Rewrite the tar with member `name`'s content replaced by `data` (a broken image, an empty caption)."""
    import io
    import tarfile

    with tarfile.open(tar_path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(tar_path, "w") as archive:
        for member, content in members:
            if member.name == name:
                content = data
                member.size = len(data)
            archive.addfile(member, io.BytesIO(content))
