"""One raw shard -> one feature shard: the unit of work a Ray task runs (and a GPU check calls).

Reads `raw/NNNNN.tar` as a stream (a truncated tar yields what was complete), decodes images,
embeds images and candidate captions with CLIP in batches, runs CapFilt, extracts labels, and
writes `features/NNNNN.tar`, `NNNNN_decisions.parquet` (one row per raw sample: written, dropped
or failed with a reason) and, last, `NNNNN_stats.json`, whose presence marks the shard done.
Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_ingest.process.feature_format import encode_feature_sample
from vlpdist.atomic import atomic_path, atomic_write_json, remove_stale_staging
from vlpdist.config import ProcessConfig

HOOK_DIR_ENV = "VLPDIST_PROCESS_HOOK_DIR"
"""Fault-injection hook for tests: after its first batch a task writes `<dir>/<shard>.<pid>.started` and waits while `<dir>/hold` exists."""


@dataclass
class RawSample:
    """The members of one sample as read from a raw tar."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes


def stats_path(features_dir: Path, shard_name: str) -> Path:
    return features_dir / f"{shard_name}_stats.json"


def read_raw_shard(tar_path: Path) -> tuple[list[RawSample], str | None]:
    """Samples in key order, and an error text if the tar ended early (the cut sample is left out).

    Key order, not tar order: img2dataset writes a shard's samples as its download threads finish,
    so tar order differs run to run; in key order every later stage (and the seeded demo CLIP)
    repeats run to run.
    """
    samples: list[RawSample] = []
    current: RawSample | None = None
    tar_error = None
    try:
        with tarfile.open(tar_path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                data = archive.extractfile(member).read()
                if current is None or current.key != key:
                    if current is not None:
                        samples.append(current)
                    current = RawSample(key)
                current.members[extension] = data
    except (tarfile.TarError, EOFError, OSError) as err:
        tar_error = f"{type(err).__name__}: {err}"
    else:
        if current is not None:
            samples.append(current)
    return sorted(samples, key=lambda sample: sample.key), tar_error


def _expected_keys(tar_path: Path) -> list[str] | None:
    """Keys img2dataset wrote into this tar (its parquet beside it), to name samples a truncation lost."""
    parquet = tar_path.with_suffix(".parquet")
    if not parquet.is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["key", "status"]).to_pydict()
    return [key for key, status in zip(table["key"], table["status"]) if status == "success"]


_MODEL_CACHE: dict[tuple, object] = {}


def _models(settings: ProcessConfig, device: str):
    """CLIP, captioner and ITM models, loaded once per worker process and reused across shards."""
    from data_ingest.process.capfilt import load_captioner, load_itm
    from data_ingest.process.clip_model import load_clip
    from data_ingest.process.labels import load_vocabulary

    cache_key = (settings.clip_model, settings.clip_pretrained, settings.captioner, settings.filter,
                 settings.itm_model, settings.vocab, device)
    if cache_key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[cache_key] = {
            "clip": load_clip(settings.clip_model, settings.clip_pretrained, device),
            "captioner": load_captioner(settings.captioner, device) if settings.captioner else None,
            "itm": load_itm(settings.itm_model, device) if settings.filter == "itm" else None,
            "vocab": load_vocabulary(settings.vocab),
        }
    return _MODEL_CACHE[cache_key]


def pick_device(settings: ProcessConfig) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() and settings.gpus_per_task > 0 else "cpu"
    return settings.device


def _run_hook(hook_dir: str, shard_name: str) -> None:
    hook = Path(hook_dir)
    hook.mkdir(parents=True, exist_ok=True)
    (hook / f"{shard_name}.{os.getpid()}.started").write_text(str(os.getpid()))
    deadline = time.time() + 120
    while (hook / "hold").exists() and time.time() < deadline:
        time.sleep(0.05)


def _decode_samples(samples: list[RawSample]):
    """(decodable samples with their RGB image and web caption, failures as (sample, reason))."""
    from PIL import Image

    good, failed = [], []
    for sample in samples:
        image_bytes = sample.members.get("jpg") or sample.members.get("png") or sample.members.get("webp")
        if not image_bytes:
            failed.append((sample, "missing_image"))
            continue
        try:
            image = Image.open(io.BytesIO(image_bytes))
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            failed.append((sample, "decode_error"))
            continue
        caption = sample.members.get("txt", b"").decode("utf-8", "replace").strip()
        good.append((sample, image, caption))
    return good, failed


def _sample_meta(sample: RawSample) -> dict:
    try:
        return json.loads(sample.members.get("json", b"{}"))
    except ValueError:
        return {}


def _propose_captions(images: list, settings: ProcessConfig, models, device: str) -> list[list[str]]:
    """Synthetic captions per image (none when the captioner is off); empty samples are no caption."""
    from data_ingest.process.capfilt import generate_captions

    if models["captioner"] is None:
        return [[] for _ in images]
    captioner, processor = models["captioner"]
    proposals = generate_captions(captioner, processor, images, settings.num_synthetic_captions,
                                  settings.top_p, settings.max_caption_tokens, device)
    return [[text for text in per_image if text] for per_image in proposals]


def _score_candidates(images: list, image_BD: np.ndarray, owners: list[int], texts: list[str],
                      settings: ProcessConfig, models, device: str):
    """CLIP text embeddings (N, D), CLIP cosines (N,), ITM probabilities (N,) or None, pass flags (N,)."""
    from data_ingest.process.capfilt import itm_probabilities
    from data_ingest.process.clip_model import encode_texts

    if not texts:
        return np.zeros((0, image_BD.shape[1]), np.float32), np.zeros(0), None, np.zeros(0, bool)
    clip_model, _, tokenizer = models["clip"]
    text_ND = encode_texts(clip_model, tokenizer, texts, device)
    clip_N = (text_ND * image_BD[owners]).sum(axis=1)
    itm_N = None
    if models["itm"] is not None:
        itm_model, itm_processor = models["itm"]
        itm_N = np.asarray(itm_probabilities(itm_model, itm_processor, [images[i] for i in owners], texts, device))
    if settings.filter == "clip":
        passes_N = clip_N >= settings.clip_threshold
    elif settings.filter == "itm":
        passes_N = itm_N >= settings.itm_threshold
    else:
        passes_N = np.ones(len(texts), dtype=bool)
    return text_ND, clip_N, itm_N, passes_N


def _process_batch(batch, settings: ProcessConfig, models, device: str) -> list[dict]:
    """CLIP + CapFilt + labels for a batch of decoded samples -> one result dict per sample."""
    import torch

    from data_ingest.process.capfilt import apply_caption_policy
    from data_ingest.process.clip_model import encode_images
    from data_ingest.process.labels import extract_labels

    clip_model, preprocess, _ = models["clip"]
    images = [image for _, image, _ in batch]
    image_BD = encode_images(clip_model, torch.stack([preprocess(image) for image in images]), device)
    synthetic = _propose_captions(images, settings, models, device)
    # Candidates flattened over the batch: sample i's web caption (if any), then its synthetic ones.
    owners, texts, rows_of = [], [], []
    for index, ((_, _, web), proposals) in enumerate(zip(batch, synthetic)):
        candidates = ([web] if web else []) + proposals
        rows_of.append(list(range(len(texts), len(texts) + len(candidates))))
        owners += [index] * len(candidates)
        texts += candidates
    text_ND, clip_N, itm_N, passes_N = _score_candidates(images, image_BD, owners, texts, settings, models, device)

    results = []
    for index, ((sample, _, web), proposals) in enumerate(zip(batch, synthetic)):
        rows = rows_of[index]
        web_row = rows[0] if web else None
        synthetic_rows = rows[1:] if web else rows
        choice = apply_caption_policy(settings.caption_policy, web, web_row is not None and bool(passes_N[web_row]),
                                      proposals, [bool(passes_N[n]) for n in synthetic_rows])
        scores = {
            "filter": settings.filter,
            "web_clip": float(clip_N[web_row]) if web_row is not None else None,
            "synthetic_captions": proposals,
            "synthetic_clip": [float(clip_N[n]) for n in synthetic_rows],
        }
        if itm_N is not None:
            scores["web_itm"] = float(itm_N[web_row]) if web_row is not None else None
            scores["synthetic_itm"] = [float(itm_N[n]) for n in synthetic_rows]
        kept_rows = ([web_row] if choice.web_kept else []) + [synthetic_rows[i] for i in choice.kept_synthetic]
        labels = sorted({label for n in kept_rows for label in extract_labels(texts[n], models["vocab"])})
        results.append({
            "sample": sample, "web": web, "choice": choice, "scores": scores,
            "image_D": image_BD[index], "kept_text_CD": text_ND[kept_rows], "kept_captions": [texts[n] for n in kept_rows],
            "labels": labels, "label_names": [models["vocab"].names[label] for label in labels],
        })
    return results


def read_inputs(raw_path: Path, captioner_on: bool):
    """Usable samples, failures as (key, url, reason), and the tar error if the tar was cut short."""
    samples, tar_error = read_raw_shard(raw_path)
    failures: list[tuple[str, str, str]] = []
    if tar_error is not None:
        expected = _expected_keys(raw_path)
        seen = {sample.key for sample in samples}
        lost = [key for key in expected if key not in seen] if expected is not None else ["<unknown>"]
        failures += [(key, "", "truncated_tar") for key in lost]
    good, undecodable = _decode_samples(samples)
    if not captioner_on:  # without a captioner, a sample with no web caption has nothing to keep
        undecodable += [(sample, "empty_caption") for sample, _, caption in good if not caption]
        good = [item for item in good if item[2]]
    failures += [(sample.key, _sample_meta(sample).get("url", ""), reason) for sample, reason in undecodable]
    return good, failures, tar_error


def _write_decisions(rows: list[dict], path: Path) -> None:
    """One row per raw sample: key, url, status (written/dropped/failed), reason, decision, web_clip, web_kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as staging:
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
            ("key", pa.string()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
            ("decision", pa.string()), ("web_clip", pa.float64()), ("web_kept", pa.bool_()),
        ])), staging)


def process_shard(raw_tar: str, features_dir: str, settings: ProcessConfig, hook_dir: str = "") -> dict:
    """Turn one raw shard into its feature shard; returns (and writes) the shard's stats."""
    import webdataset as wds

    started = time.time()
    raw_path, out_dir = Path(raw_tar), Path(features_dir)
    shard_name = raw_path.name.split(".")[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    feature_tar, decisions_file = out_dir / f"{shard_name}.tar", out_dir / f"{shard_name}_decisions.parquet"
    for output in (feature_tar, decisions_file, stats_path(out_dir, shard_name)):
        remove_stale_staging(output)  # left by an attempt whose worker died
    device = pick_device(settings)
    models = _models(settings, device)
    good, failures, tar_error = read_inputs(raw_path, captioner_on=bool(settings.captioner))

    rows = [{"key": key, "url": url, "status": "failed", "reason": reason, "decision": "", "web_clip": None,
             "web_kept": False} for key, url, reason in failures]
    decision_counts, captions_kept, synthetic_kept = Counter(), 0, 0
    with atomic_path(feature_tar) as staged_tar, wds.TarWriter(str(staged_tar)) as sink:
        for start in range(0, len(good), settings.batch_size):
            for result in _process_batch(good[start : start + settings.batch_size], settings, models, device):
                sample, choice = result["sample"], result["choice"]
                url = _sample_meta(sample).get("url", "")
                decision_counts[choice.decision] += 1
                if choice.kept:
                    sink.write(encode_feature_sample(
                        key=sample.key, image_embedding=result["image_D"], text_embeddings=result["kept_text_CD"],
                        captions=result["kept_captions"], labels=result["labels"], label_names=result["label_names"],
                        scores=result["scores"], decision=choice.decision, url=url, original_caption=result["web"],
                    ))
                    captions_kept += len(choice.kept)
                    synthetic_kept += len(choice.kept_synthetic)
                rows.append({"key": sample.key, "url": url, "status": "written" if choice.kept else "dropped",
                             "reason": "", "decision": choice.decision, "web_clip": result["scores"]["web_clip"],
                             "web_kept": choice.web_kept})
            if hook_dir and start == 0:
                _run_hook(hook_dir, shard_name)  # tests kill the worker here, mid-shard
    _write_decisions(rows, decisions_file)

    stats = {
        "shard": shard_name,
        "raw_samples": len(rows),
        "written": sum(row["status"] == "written" for row in rows),
        "dropped_by_filter": decision_counts["drop"],
        "failed": dict(Counter(reason for _, _, reason in failures)),
        "decisions": dict(decision_counts),
        "captions_kept": captions_kept,
        "synthetic_captions_kept": synthetic_kept,
        "tar_error": tar_error,
        "device": device,
        "seconds": round(time.time() - started, 3),
    }
    atomic_write_json(stats_path(out_dir, shard_name), stats)  # last: its presence marks the shard done
    return stats
