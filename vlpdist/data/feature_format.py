"""The feature shard format: the contract between the processing stage (producer) and training
(consumer), kept in the library so that both import it and the library imports neither.

`<root>/features/NNNNN.tar` is a webdataset tar (same shard number as `raw/NNNNN.tar`) beside
`<root>/features/NNNNN_stats.json`. Only samples with at least one kept caption are written.
Each sample, keyed by its raw sample key, holds:

- `img.npy`: float16 (D,), the L2-normalised CLIP image embedding;
- `txt.npy`: float16 (C, D), L2-normalised CLIP text embeddings of the C >= 1 kept captions,
  in the order of `captions`;
- `json`: captions, labels (sorted unique int ids, union over kept captions), label_names,
  scores (every filter score), decision, source_key, url, original_caption; and for a question
  sample (issue 18) the `vlpdist.data.question_answer` keys: question, answers (list of str),
  question_type and answer_type when known. Absent keys mean a caption sample only.
  With paraphrasing on (`process.paraphraser`, issue 18 item 6): `caption_paraphrases`, one list
  of up to k paraphrases per kept caption (in the order of `captions`), and for a question sample
  `question_paraphrases`, up to k paraphrases of its question. They are marked by their keys,
  never mixed into `captions`; shards without them (paraphrasing off, older shards) read as none.

A question sample may keep no caption (VQAv2 rows have none): `captions` is then empty and
`txt.npy` holds ONE row, the CLIP text embedding of its alignment text
(`question_answer.alignment_text`: the question and its most common answer), which ITC and SupCon
use in place of a caption.

`.npy` members are plain numpy files (no pickles), readable with `np.load(allow_pickle=False)`.

`<root>/features/label_vocabulary.json` records the object vocabulary the label ids index
(`{"names": [...], "fingerprint": ...}`), so an id means the same category in every shard, run
and checkpoint.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from vlpdist.data.question_answer import qa_fields

LABEL_VOCABULARY_FILE = "label_vocabulary.json"
IMAGE_MEMBER = "img.npy"
TEXT_MEMBER = "txt.npy"
META_MEMBER = "json"


@dataclass
class FeatureSample:
    """One decoded feature sample."""

    key: str
    image_embedding: np.ndarray  # (D,) float16, unit norm
    text_embeddings: np.ndarray  # (C, D) float16, unit norm rows, one per kept caption
    captions: list[str]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    decision: str = ""
    source_key: str = ""
    url: str = ""
    original_caption: str = ""
    qa: dict[str, Any] = field(default_factory=dict)  # question, answers, question_type, answer_type; {} for captions only
    caption_paraphrases: list[list[str]] = field(default_factory=list)  # per kept caption; [] when none were written
    question_paraphrases: list[str] = field(default_factory=list)  # of qa["question"]; [] when none were written


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_array(value: bytes | np.ndarray) -> np.ndarray:
    if isinstance(value, np.ndarray):  # a webdataset pipeline with `.decode()` already loaded it
        return value
    return np.load(io.BytesIO(value), allow_pickle=False)


def encode_feature_sample(
    key: str,
    image_embedding: np.ndarray,
    text_embeddings: np.ndarray,
    captions: list[str],
    labels: Iterable[int],
    label_names: list[str],
    scores: dict[str, Any],
    decision: str,
    url: str,
    original_caption: str,
    qa: dict[str, Any] | None = None,
    caption_paraphrases: list[list[str]] | None = None,
    question_paraphrases: list[str] | None = None,
) -> dict[str, Any]:
    """A dict ready for `webdataset.TarWriter.write`. Checks shapes and the C >= 1 rule (a question
    sample without captions has C = 1: its alignment text's embedding). `qa`: `question_answer.qa_fields`.
    Paraphrases (None: not written): one list per kept caption, and a list for the question."""
    image_D = np.asarray(image_embedding, dtype=np.float16)
    text_CD = np.atleast_2d(np.asarray(text_embeddings, dtype=np.float16))
    if image_D.ndim != 1:
        raise ValueError(f"image embedding must be 1-D, got shape {image_D.shape}")
    if text_CD.ndim != 2 or text_CD.shape[1] != image_D.shape[0]:
        raise ValueError(f"text embeddings must be (C, {image_D.shape[0]}), got {text_CD.shape}")
    qa = dict(qa or {})
    if qa and not (qa.get("question") and qa.get("answers")):
        raise ValueError("a question sample needs a question and at least one answer")
    expected = len(captions) if captions or not qa else 1
    if expected == 0 or expected != text_CD.shape[0]:
        raise ValueError(f"need one text embedding per kept caption (>= 1): {len(captions)} vs {text_CD.shape[0]}")
    paraphrases = {}
    if caption_paraphrases is not None:
        if len(caption_paraphrases) != len(captions):
            raise ValueError(f"need one list of paraphrases per kept caption: {len(captions)} vs {len(caption_paraphrases)}")
        paraphrases["caption_paraphrases"] = [[str(text) for text in texts] for texts in caption_paraphrases]
    if question_paraphrases is not None:
        if not qa:
            raise ValueError("question paraphrases need a question sample")
        paraphrases["question_paraphrases"] = [str(text) for text in question_paraphrases]
    meta = {
        "captions": list(captions),
        "labels": sorted({int(label) for label in labels}),
        "label_names": list(label_names),
        "scores": scores,
        "decision": decision,
        "source_key": key,
        "url": url,
        "original_caption": original_caption,
        **qa,
        **paraphrases,
    }
    return {
        "__key__": key,
        IMAGE_MEMBER: _npy_bytes(image_D),
        TEXT_MEMBER: _npy_bytes(text_CD),
        META_MEMBER: json.dumps(meta).encode("utf-8"),
    }


def decode_feature_sample(sample: dict[str, Any]) -> FeatureSample:
    """The inverse of `encode_feature_sample`; takes raw webdataset bytes or already-decoded values."""
    meta = sample[META_MEMBER]
    if isinstance(meta, (bytes, bytearray, str)):
        meta = json.loads(meta)
    return FeatureSample(
        key=sample["__key__"],
        image_embedding=_npy_array(sample[IMAGE_MEMBER]),
        text_embeddings=_npy_array(sample[TEXT_MEMBER]),
        captions=list(meta["captions"]),
        labels=[int(label) for label in meta["labels"]],
        label_names=list(meta.get("label_names", [])),
        scores=dict(meta.get("scores", {})),
        decision=meta.get("decision", ""),
        source_key=meta.get("source_key", sample["__key__"]),
        url=meta.get("url", ""),
        original_caption=meta.get("original_caption", ""),
        qa=qa_fields(meta),
        caption_paraphrases=[list(texts) for texts in meta.get("caption_paraphrases", [])],
        question_paraphrases=list(meta.get("question_paraphrases", [])),
    )


def iterate_feature_shards(urls: str | list[str]) -> Iterator[FeatureSample]:
    """Stream decoded samples from shards: local paths, brace patterns, `pipe:` commands or URLs."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for sample in dataset:
        yield decode_feature_sample(sample)


def label_vocabulary_fingerprint(names: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]


def write_label_vocabulary(features_dir, names: list[str]) -> None:
    """Record the label vocabulary beside the shards (atomically); refuse one that differs from a recorded one."""
    from pathlib import Path

    from vlpdist.atomic import atomic_write_json
    from vlpdist.errors import UserError

    path = Path(features_dir) / LABEL_VOCABULARY_FILE
    recorded = read_label_vocabulary(features_dir)
    if recorded is not None and recorded != list(names):
        raise UserError(
            f"{path} records another label vocabulary ({len(recorded)} names, fingerprint "
            f"{label_vocabulary_fingerprint(recorded)}) than this run's ({len(names)} names): label ids would change meaning; "
            "process into a new folder"
        )
    atomic_write_json(path, {"names": list(names), "fingerprint": label_vocabulary_fingerprint(list(names))})


def read_label_vocabulary(features_dir) -> list[str] | None:
    """The recorded label vocabulary's names (index = label id), or None when the folder records none."""
    from pathlib import Path

    path = Path(features_dir) / LABEL_VOCABULARY_FILE
    if not path.is_file():
        return None
    return list(json.loads(path.read_text())["names"])
