"""One raw shard -> one feature shard: the unit of work a Ray actor runs (and a GPU check calls).

A task streams its shard. A first pass over `raw/NNNNN.tar` (a plain tar, as img2dataset writes
it) notes where each member's bytes lie and where the archive ends early, if it does. Then a torch
`DataLoader` reads the samples in key order, a chunk of `batch_size` at a time, and its worker
processes decode the images and run every model's image preprocessing (the clip-retrieval habit),
while the task's own thread runs CLIP, the captioner, the filter and the paraphraser on batches. So a task holds a
few chunks of images, never the whole shard, and a GPU is fed while the next chunks decode. The
loader gets `process.loader_workers` workers (default `floor(process.cpus_per_task) - 1`): one CPU drives the models, the others
decode (with one CPU the loader runs in the task's thread). The workers are started once per task
(`ChunkLoader`: a Ray actor, or one `ShardProcessor`) and reused for every shard it is given, so a
shard pays for decoding, not for forking and importing.

Outputs: `features/NNNNN.tar`, `NNNNN_decisions.parquet` (one row per raw sample: written, dropped
or failed with a reason) and, last, `NNNNN_stats.json`, whose presence marks the shard done. Every
file is written under a temporary name and renamed.

Only a cut or corrupt archive is a data failure (`truncated_tar`, one row for every sample it
lost, named from img2dataset's parquet): `tarfile` raising, an archive that stops without its
end-of-archive block (`tarfile` reads a cut or invalid header past the first as a normal end), or
one that lacks samples the parquet lists as downloaded. Any other `OSError` (a file system
hiccup, a shard not yet readable) propagates: the task fails and the driver retries it.

Decoding admits only the formats web images come in (`ADMITTED_IMAGE_FORMATS`) and at most
`process.max_image_pixels` pixels; anything else is a failed row with its reason.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from vlpdist.data.feature_format import encode_feature_sample
from vlpdist.data.tars import end_of_archive_error
from vlpdist.atomic import atomic_path, atomic_write_json, remove_stale_staging
from vlpdist.config import ProcessConfig
from vlpdist.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
"""Members that can hold a sample's image, in the order they are looked for."""

ADMITTED_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""PIL formats a sample's image may be in: img2dataset re-encodes to JPEG, PNG or WebP, and with
resizing off it keeps what the server sent (GIF, BMP and TIFF are served too). Other PIL decoders
(EPS through Ghostscript, PSD, ICO, ...) never see web bytes."""


@dataclass
class RawSample:
    """The members of one sample as read from a raw tar."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes


@dataclass
class IndexedSample:
    """Where the members of one sample lie in its raw tar."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # extension -> (byte offset, size)


QUESTION_ONLY_DECISION = "question_only"
"""The decision of a question sample written without a caption (issue 18): its row had none, or
the filter dropped it (its scores say which); its text embedding is its alignment text's."""


def stats_path(features_dir: Path, shard_name: str) -> Path:
    return features_dir / f"{shard_name}_stats.json"


@dataclass
class RawIndex:
    """What the first pass over a raw tar found: its whole samples in key order, the error text if
    the archive is cut or corrupt, and a (key, url, "truncated_tar") row for each sample it lost."""

    samples: list[IndexedSample]
    tar_error: str | None
    lost: list[tuple[str, str, str]]


def _scan_members(tar_path: Path) -> tuple[list[IndexedSample], IndexedSample | None, str | None]:
    """(the samples before the last one, the last one, an error text if the archive is cut), in tar order.

    Every member is read through (and dropped) with tarfile's stream reader, so a cut in the data
    is found wherever it is, and where the reading stops must be an end-of-archive block (a cut at
    or in a header reads to tarfile as the end). An `OSError` opening or reading the file is not a
    cut: it propagates.
    """
    samples: list[IndexedSample] = []
    current: IndexedSample | None = None
    with open(tar_path, "rb") as raw_file:
        try:
            with tarfile.open(fileobj=raw_file, mode="r|*") as archive:
                if archive.fileobj.comptype != "tar":  # offsets would point into the compressed stream
                    raise UserError(f"raw shard {tar_path} is {archive.fileobj.comptype}-compressed; "
                                    "the processing stage reads plain tars, as img2dataset writes them")
                for member in archive:
                    if not member.isfile():
                        continue
                    directory, _, base = member.name.rpartition("/")
                    stem, _, extension = base.partition(".")
                    key = f"{directory}/{stem}" if directory else stem
                    if current is None or current.key != key:  # before reading: a cut in this member is this sample's
                        if current is not None:
                            samples.append(current)
                        current = IndexedSample(key)
                    content = archive.extractfile(member)
                    while content.read(1 << 20):
                        pass
                    current.members[extension] = (member.offset_data, member.size)
                    archive.members = []  # tarfile keeps every header it read; the index is all this needs
                end = archive.offset  # where the header that stopped the reading begins
        except (tarfile.ReadError, EOFError) as err:
            return samples, current, f"{type(err).__name__}: {err}"
        return samples, current, end_of_archive_error(raw_file, end)


def _downloaded_samples(tar_path: Path) -> list[tuple[str, str]] | None:
    """(key, url) of each sample img2dataset wrote into this tar, from its parquet beside it (None without one)."""
    parquet = tar_path.with_suffix(".parquet")
    if not parquet.is_file():
        return None
    import pyarrow.parquet as pq

    columns = [name for name in ("key", "status", "url") if name in pq.read_schema(parquet).names]
    table = pq.read_table(parquet, columns=columns).to_pydict()
    urls = table.get("url", [""] * len(table["key"]))
    return [(key, url) for key, status, url in zip(table["key"], table["status"], urls) if status == "success"]


def index_raw_shard(tar_path: Path) -> RawIndex:
    """Where each whole sample of a raw tar lies, in key order, checked against img2dataset's parquet.

    Key order, not tar order: img2dataset writes a shard's samples as its download threads finish,
    so tar order differs run to run; in key order every later stage (and the seeded demo CLIP)
    repeats run to run. An archive that lacks samples its parquet lists as downloaded is cut too
    (a tail of zeros after a crash reads as a normal end). When the archive is cut, the sample it
    was in (the last one read) may miss members, so it is lost with the rest: every downloaded
    sample ends as a whole sample or a `truncated_tar` row (one `<unknown>` row without the parquet).
    """
    samples, last, tar_error = _scan_members(tar_path)
    downloaded = _downloaded_samples(tar_path)
    if tar_error is None and downloaded is not None:
        found = {sample.key for sample in samples} | ({last.key} if last is not None else set())
        missing = [key for key, _ in downloaded if key not in found]
        if missing:
            tar_error = (f"the archive holds {len(downloaded) - len(missing)} of the {len(downloaded)} samples its "
                         f"parquet lists as downloaded (first missing: {missing[0]})")
    if tar_error is None and last is not None:
        samples.append(last)
    if tar_error is None:
        lost = []
    elif downloaded is None:
        lost = [("<unknown>", "", "truncated_tar")]
    else:
        whole = {sample.key for sample in samples}
        lost = [(key, url, "truncated_tar") for key, url in downloaded if key not in whole]
    return RawIndex(sorted(samples, key=lambda sample: sample.key), tar_error, lost)


def _read_sample(raw_file, tar_path: Path, indexed: IndexedSample) -> RawSample:
    sample = RawSample(indexed.key)
    for extension, (offset, size) in indexed.members.items():
        raw_file.seek(offset)
        sample.members[extension] = raw_file.read(size)
        if len(sample.members[extension]) != size:  # the file changed since it was indexed: try again later
            raise OSError(f"{tar_path}: member {indexed.key}.{extension} is shorter than when the shard was indexed")
    return sample


def _sample_meta(sample: RawSample) -> dict:
    try:
        return json.loads(sample.members.get("json", b"{}"))
    except ValueError:
        return {}


def _decode(sample: RawSample, max_pixels: int):
    """(RGB image, web caption, "") for a usable sample, (None, caption, reason) for one that is not:
    missing_image, decode_error (not an image in an admitted format, or broken) or too_many_pixels."""
    import warnings

    from PIL import Image

    caption = sample.members.get("txt", b"").decode("utf-8", "replace").strip()
    image_bytes = next((sample.members[ext] for ext in IMAGE_EXTENSIONS if sample.members.get(ext)), None)
    if not image_bytes:
        return None, caption, "missing_image"
    # PIL's bound is a module global, checked on opening (before any pixel is decoded) and on each
    # GIF frame: this stage's bound while it decodes, the caller's after. Above the bound PIL only
    # warns (it raises above twice it): the warning becomes an error, so the image is refused.
    bound_before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(image_bytes), formats=ADMITTED_IMAGE_FORMATS)
            image.load()
        return image.convert("RGB"), caption, ""
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, caption, "too_many_pixels"
    except (OSError, ValueError):
        return None, caption, "decode_error"
    finally:
        Image.MAX_IMAGE_PIXELS = bound_before


def read_inputs(raw_path: Path, captioner_on: bool, max_pixels: int):
    """The whole shard at once, for callers that need every pair (the demo CLIP's training): usable
    samples as (sample, RGB image, caption), failures as (key, url, reason), and the tar error if
    the tar was cut short. The processing task streams instead (`ChunkLoader`)."""
    index = index_raw_shard(raw_path)
    failures = list(index.lost)
    good, undecodable = [], []
    with open(raw_path, "rb") as raw_file:
        for entry in index.samples:
            sample = _read_sample(raw_file, raw_path, entry)
            image, caption, reason = _decode(sample, max_pixels)
            if reason:
                undecodable.append((sample, reason))
            else:
                good.append((sample, image, caption))
    if not captioner_on:  # without a captioner, a sample with no web caption has nothing to keep
        undecodable += [(sample, "empty_caption") for sample, _, caption in good if not caption]
        good = [item for item in good if item[2]]
    failures += [(sample.key, _sample_meta(sample).get("url", ""), reason) for sample, reason in undecodable]
    return good, failures, index.tar_error


@dataclass
class DecodedSample:
    """A usable sample, ready for the models: its image as each model's preprocessing made it."""

    key: str
    url: str
    caption: str
    pixels: dict[str, object]  # model name ("clip", "captioner", "itm") -> (3, H, W) tensor
    qa: dict = field(default_factory=dict)  # `question_answer.qa_fields` of the row; {} for a caption row


@dataclass
class DecodedChunk:
    """What a loader worker returns for a chunk of raw samples (in key order)."""

    samples: list[DecodedSample] = field(default_factory=list)
    undecodable: list[tuple[str, str, str]] = field(default_factory=list)  # (key, url, reason `_decode` gave)
    empty_caption: list[tuple[str, str, str]] = field(default_factory=list)  # (key, url, "empty_caption")


def _question_of(meta: dict) -> tuple[dict, str]:
    """(the row's question fields, "") or ({}, "bad_answers") when its answers are not a list of
    strings or are missing: that row fails with the reason, the shard goes on."""
    from vlpdist.data.question_answer import ANSWERS, qa_fields

    try:
        qa = qa_fields(meta)
    except ValueError:
        return {}, "bad_answers"
    if qa and not qa[ANSWERS]:
        return {}, "bad_answers"
    return qa, ""


def _clip_pixels(preprocess, images: list):
    """open_clip's transform of each image -> (B, 3, H, W)."""
    import torch

    return torch.stack([preprocess(image) for image in images])


def _blip_pixels(processor, images: list):
    """A BLIP processor's image transform -> (B, 3, H, W)."""
    return processor(images=images, return_tensors="pt")["pixel_values"]


class _ChunkDecoder:
    """Map-style dataset whose index is a job, (raw tar path, the IndexedSample entries of one chunk in
    key order): those samples read, decoded and preprocessed by every model's transform (in a loader
    worker, or the task's thread). The job carries the shard, so one set of workers serves every shard."""

    def __init__(self, transforms: dict, drop_empty_captions: bool, max_pixels: int):
        self.transforms, self.drop_empty_captions, self.max_pixels = transforms, drop_empty_captions, max_pixels

    def __getitem__(self, job: tuple[str, list[IndexedSample]]) -> DecodedChunk:
        tar_name, entries = job
        tar_path = Path(tar_name)
        chunk = DecodedChunk()
        images = []
        with open(tar_path, "rb") as raw_file:
            for entry in entries:
                sample = _read_sample(raw_file, tar_path, entry)
                meta = _sample_meta(sample)
                url = meta.get("url", "")
                image, caption, reason = _decode(sample, self.max_pixels)
                qa, qa_error = _question_of(meta)
                if reason or qa_error:
                    chunk.undecodable.append((sample.key, url, reason or qa_error))
                # A question row with no caption (VQAv2) is not a web caption to filter: it is kept for its question.
                elif self.drop_empty_captions and not caption and not qa:  # no captioner: nothing it could keep
                    chunk.empty_caption.append((sample.key, url, "empty_caption"))
                else:
                    chunk.samples.append(DecodedSample(sample.key, url, caption, {}, qa))
                    images.append(image)
        if images:
            for name, transform in self.transforms.items():
                pixels_B3HW = transform(images)
                for decoded, pixels_3HW in zip(chunk.samples, pixels_B3HW):
                    decoded.pixels[name] = pixels_3HW
        return chunk


class _ChunkJobs:
    """The loader's sampler: the jobs of the shard in hand, replaced before each shard (the sampler
    runs in the task's process and is iterated afresh at every pass over the loader)."""

    def __init__(self):
        self.jobs: list[tuple[str, list[IndexedSample]]] = []

    def __iter__(self):
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


class ChunkLoader:
    """A task's decoding workers: one torch `DataLoader` with persistent workers, started at the first
    shard and reused for every later one, so forking and importing in the workers is paid once per
    task, not once per shard. A shard that fails (or is abandoned) part way shuts the workers down,
    and the next shard starts fresh ones: a worker that died must not be waited on again."""

    def __init__(self, models: dict, settings: ProcessConfig, persistent: bool = True):
        self.workers, self.persistent = loader_workers(settings), persistent
        self.decoder = _ChunkDecoder(_image_transforms(models), drop_empty_captions=not settings.captioner,
                                     max_pixels=settings.max_image_pixels)
        self.jobs = _ChunkJobs()
        self.loader = None
        self.passes = 0  # which pass is the current one: a stale pass's late close must not stop the next one's workers

    def _make_loader(self):
        import torch

        # Its own generator: a loader draws its workers' base seed from it, which from the global one
        # would shift the captioner's sampling.
        return torch.utils.data.DataLoader(self.decoder, batch_size=None, sampler=self.jobs, num_workers=self.workers,
                                           collate_fn=_as_is, prefetch_factor=2 if self.workers else None,
                                           persistent_workers=self.persistent and self.workers > 0, generator=torch.Generator())

    def chunks(self, tar_path: Path, indexed: list[IndexedSample], chunk_size: int):
        """The shard's chunks of `chunk_size` raw samples, decoded, in key order."""
        self.jobs.jobs = [(str(tar_path), indexed[start : start + chunk_size]) for start in range(0, len(indexed), chunk_size)]
        if self.loader is None:
            self.loader = self._make_loader()
        self.passes += 1
        this_pass = self.passes
        try:
            yield from self.loader
        except BaseException:  # GeneratorExit included: an unfinished pass leaves the workers mid-shard
            if self.passes == this_pass:
                self.close()
            raise

    def close(self) -> None:
        """Stop the workers now (they would stop with the loader's last reference, at a time GC picks)."""
        loader, self.loader = self.loader, None
        iterator = getattr(loader, "_iterator", None)  # a persistent loader keeps its one iterator there
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def _as_is(chunk: DecodedChunk) -> DecodedChunk:
    """The loader's collate: a chunk is already what the task wants (a module function, so workers can pickle it)."""
    return chunk


def load_models(settings: ProcessConfig, device: str) -> dict:
    """CLIP, captioner, ITM and paraphrase models on `device`, and the label vocabulary."""
    from data_ingest.process.capfilt import load_captioner, load_itm
    from data_ingest.process.clip_model import load_clip
    from data_ingest.process.labels import load_vocabulary
    from data_ingest.process.paraphrase import load_paraphraser

    return {
        "clip": load_clip(settings.clip_model, settings.clip_pretrained, device),
        "captioner": load_captioner(settings.captioner, device) if settings.captioner else None,
        "itm": load_itm(settings.itm_model, device) if settings.filter == "itm" else None,
        "paraphraser": load_paraphraser(settings.paraphraser, device) if settings.paraphraser else None,
        "vocab": load_vocabulary(settings.vocab),
    }


def _image_transforms(models: dict) -> dict:
    """Model name -> its image preprocessing, run in the loader workers."""
    transforms = {"clip": partial(_clip_pixels, models["clip"][1])}
    for name in ("captioner", "itm"):
        if models[name] is not None:
            transforms[name] = partial(_blip_pixels, models[name][1])
    return transforms


def pick_device(settings: ProcessConfig) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() and settings.gpus_per_task > 0 else "cpu"
    return settings.device


def loader_workers(settings: ProcessConfig) -> int:
    """Decoding processes beside the task's thread: process.loader_workers, or by default all the task's CPUs but the one that drives the models."""
    if settings.loader_workers >= 0:
        return settings.loader_workers
    return max(0, math.floor(settings.cpus_per_task) - 1)


def _stack(batch: list[DecodedSample], name: str):
    import torch

    return torch.stack([sample.pixels[name] for sample in batch])  # (B, 3, H, W)


def _propose_captions(batch: list[DecodedSample], settings: ProcessConfig, models, device: str) -> list[list[str]]:
    """Synthetic captions per image (none when the captioner is off); empty samples are no caption."""
    from data_ingest.process.capfilt import generate_captions

    if models["captioner"] is None:
        return [[] for _ in batch]
    captioner, processor = models["captioner"]
    proposals = generate_captions(captioner, processor, _stack(batch, "captioner"), settings.num_synthetic_captions,
                                  settings.top_p, settings.max_caption_tokens, device)
    return [[text for text in per_image if text] for per_image in proposals]


def _score_candidates(batch: list[DecodedSample], image_BD: np.ndarray, owners: list[int], texts: list[str],
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
        candidates_B = np.bincount(owners, minlength=len(batch))  # owners are ascending: image i's texts are adjacent
        itm_N = np.asarray(itm_probabilities(itm_model, itm_processor, _stack(batch, "itm"), candidates_B.tolist(),
                                             texts, device))
    if settings.filter == "clip":
        passes_N = clip_N >= settings.clip_threshold
    elif settings.filter == "itm":
        passes_N = itm_N >= settings.itm_threshold
    else:
        passes_N = np.ones(len(texts), dtype=bool)
    return text_ND, clip_N, itm_N, passes_N


def _add_paraphrases(results: list[dict], settings: ProcessConfig, models, device: str) -> None:
    """Each result's `caption_paraphrases` (one list per kept caption) and `question_paraphrases`
    (None: not a question sample), from one paraphraser call over the batch's texts; nothing when paraphrasing is off."""
    from data_ingest.process.paraphrase import paraphrase_texts
    from vlpdist.data.question_answer import QUESTION

    if models.get("paraphraser") is None:
        return
    texts = [text for result in results for text in result["kept_captions"]]
    texts += [result["sample"].qa[QUESTION] for result in results if result["sample"].qa]
    found = iter(paraphrase_texts(models["paraphraser"], texts, settings, device))
    by_caption = [[next(found) for _ in result["kept_captions"]] for result in results]
    for result, caption_paraphrases in zip(results, by_caption):
        result["caption_paraphrases"] = caption_paraphrases
        result["question_paraphrases"] = next(found) if result["sample"].qa else None


def _process_batch(batch: list[DecodedSample], settings: ProcessConfig, models, device: str) -> list[dict]:
    """CLIP + CapFilt + labels (+ paraphrases) for a batch of decoded samples -> one result dict per sample."""
    from data_ingest.process.capfilt import apply_caption_policy
    from data_ingest.process.clip_model import encode_images
    from data_ingest.process.clip_model import encode_texts
    from data_ingest.process.labels import extract_labels
    from vlpdist.data.question_answer import ANSWERS, QUESTION, alignment_text

    image_BD = encode_images(models["clip"][0], _stack(batch, "clip"), device)
    synthetic = _propose_captions(batch, settings, models, device)
    # Candidates flattened over the batch: sample i's web caption (if any), then its synthetic ones.
    owners, texts, rows_of = [], [], []
    for index, (sample, proposals) in enumerate(zip(batch, synthetic)):
        candidates = ([sample.caption] if sample.caption else []) + proposals
        rows_of.append(list(range(len(texts), len(texts) + len(candidates))))
        owners += [index] * len(candidates)
        texts += candidates
    text_ND, clip_N, itm_N, passes_N = _score_candidates(batch, image_BD, owners, texts, settings, models, device)

    # A question sample aligns with its question + most common answer when it keeps no caption (feature_format).
    alignment_texts = [alignment_text(sample.qa[QUESTION], sample.qa[ANSWERS]) if sample.qa else "" for sample in batch]
    asked = [index for index, sample in enumerate(batch) if sample.qa]
    alignment_ND = encode_texts(models["clip"][0], models["clip"][2], [alignment_texts[i] for i in asked], device) if asked else None
    results = []
    for index, (sample, proposals) in enumerate(zip(batch, synthetic)):
        web, rows = sample.caption, rows_of[index]
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
        labelled = [texts[n] for n in kept_rows]
        if sample.qa:  # the question and its answers name objects as captions do
            labelled += [sample.qa[QUESTION], *dict.fromkeys(sample.qa[ANSWERS])]
        labels = sorted({label for text in labelled for label in extract_labels(text, models["vocab"])})
        question_only = bool(sample.qa) and not kept_rows
        results.append({
            "sample": sample, "choice": choice, "scores": scores,
            "image_D": image_BD[index], "kept_captions": [texts[n] for n in kept_rows],
            "kept_text_CD": alignment_ND[asked.index(index)][None] if question_only else text_ND[kept_rows],
            "question_only": question_only,
            "labels": labels, "label_names": [models["vocab"].names[label] for label in labels],
            "caption_paraphrases": None, "question_paraphrases": None,
        })
    _add_paraphrases(results, settings, models, device)
    return results


def _write_decisions(rows: list[dict], path: Path) -> None:
    """One row per raw sample: key, url, status (written/dropped/failed), reason, decision, web_clip, web_kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as staging:
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
            ("key", pa.string()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
            ("decision", pa.string()), ("web_clip", pa.float64()), ("web_kept", pa.bool_()),
        ])), staging)


def _batches(chunks, batch_size: int):
    """Consecutive batches of `batch_size` usable samples (the last may be short) from the loader's chunks."""
    waiting: list[DecodedSample] = []
    for chunk in chunks:
        waiting += chunk.samples
        while len(waiting) >= batch_size:
            yield waiting[:batch_size]
            del waiting[:batch_size]
    if waiting:
        yield waiting


def _run_shard(raw_tar: str, features_dir: str, settings: ProcessConfig, models: dict, device: str,
               chunk_loader: ChunkLoader | None = None) -> dict:
    """Turn one raw shard into its feature shard with loaded models, decoded by `chunk_loader`'s workers
    (None: workers of its own, stopped at the end); returns (and writes) the shard's stats."""
    import webdataset as wds

    from data_ingest.process.paraphrase import paraphrase_signature

    started = time.time()
    raw_path, out_dir = Path(raw_tar), Path(features_dir)
    shard_name = raw_path.name.split(".")[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    feature_tar, decisions_file = out_dir / f"{shard_name}.tar", out_dir / f"{shard_name}_decisions.parquet"
    for output in (feature_tar, decisions_file, stats_path(out_dir, shard_name)):
        remove_stale_staging(output)  # left by an attempt whose worker died
    index = index_raw_shard(raw_path)
    # A shard alone (no chunk_loader) gets workers of its own, which stop once its chunks are read.
    if chunk_loader is None:
        chunk_loader = ChunkLoader(models, settings, persistent=False)
    loader = chunk_loader.chunks(raw_path, index.samples, settings.batch_size)
    undecodable, empty_caption = [], []

    def counted(loaded_chunks):  # the failures of each chunk, kept aside as its samples go on to the batches
        for chunk in loaded_chunks:
            undecodable.extend(chunk.undecodable)
            empty_caption.extend(chunk.empty_caption)
            yield chunk

    processed_rows: list[dict] = []
    decision_counts, captions_kept, synthetic_kept, questions_written, paraphrases_written = Counter(), 0, 0, 0, 0
    with atomic_path(feature_tar) as staged_tar, wds.TarWriter(str(staged_tar)) as sink:
        for batch in _batches(counted(loader), settings.batch_size):
            for result in _process_batch(batch, settings, models, device):
                sample, choice = result["sample"], result["choice"]
                # A question sample that keeps no caption (none given, or the filter dropped it) is written for its question.
                decision = QUESTION_ONLY_DECISION if result["question_only"] else choice.decision
                written = bool(choice.kept) or result["question_only"]
                decision_counts[decision] += 1
                questions_written += int(written and bool(sample.qa))
                if written:
                    sink.write(encode_feature_sample(
                        key=sample.key, image_embedding=result["image_D"], text_embeddings=result["kept_text_CD"],
                        captions=result["kept_captions"], labels=result["labels"], label_names=result["label_names"],
                        scores=result["scores"], decision=decision, url=sample.url,
                        original_caption=sample.caption, qa=sample.qa,
                        caption_paraphrases=result["caption_paraphrases"], question_paraphrases=result["question_paraphrases"],
                    ))
                    paraphrases_written += sum(map(len, result["caption_paraphrases"] or []))
                    paraphrases_written += len(result["question_paraphrases"] or [])
                    captions_kept += len(choice.kept)
                    synthetic_kept += len(choice.kept_synthetic)
                    sink.tarstream.members = []  # tarfile keeps every header it wrote; nothing reads them back
                processed_rows.append({"key": sample.key, "url": sample.url,
                                       "status": "written" if written else "dropped", "reason": "",
                                       "decision": decision, "web_clip": result["scores"]["web_clip"],
                                       "web_kept": choice.web_kept})
    # Failures first, as (key, url, reason): what the cut lost, then undecodable, then captionless samples.
    failures = index.lost + undecodable + empty_caption
    rows = [{"key": key, "url": url, "status": "failed", "reason": reason, "decision": "", "web_clip": None,
             "web_kept": False} for key, url, reason in failures] + processed_rows
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
        "questions_written": questions_written,
        "paraphrases_written": paraphrases_written,
        "paraphrase": paraphrase_signature(settings),  # a run with other paraphrase settings processes the shard again
        "tar_error": index.tar_error,
        "device": device,
        "seconds": round(time.time() - started, 3),
    }
    atomic_write_json(stats_path(out_dir, shard_name), stats)  # last: its presence marks the shard done
    return stats


class ShardProcessor:
    """The models of one device, loaded once, and the shards processed with them.

    The stage runs one as a Ray actor per GPU (or per `cpus_per_task` CPUs): an actor keeps the
    device Ray gave it for its whole life, so its models never sit on another task's GPU.
    """

    def __init__(self, settings: ProcessConfig):
        self.settings = settings
        self.device = pick_device(settings)
        self.models = load_models(settings, self.device)
        self.chunk_loader = ChunkLoader(self.models, settings)  # its workers start at the first shard, then stay

    def ready(self) -> str:
        """Answers once the models are loaded (the driver hands out shards only to ready actors)."""
        return self.device

    def process(self, raw_tar: str, features_dir: str) -> dict:
        return _run_shard(raw_tar, features_dir, self.settings, self.models, self.device, self.chunk_loader)


_MODEL_CACHE: dict[tuple, dict] = {}


def process_shard(raw_tar: str, features_dir: str, settings: ProcessConfig) -> dict:
    """One shard in this process, outside Ray (the benchmark, a GPU check, tests); the models are
    loaded once per process and model settings."""
    device = pick_device(settings)
    cache_key = (settings.clip_model, settings.clip_pretrained, settings.captioner, settings.filter,
                 settings.itm_model, settings.paraphraser, settings.vocab, device)
    if cache_key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[cache_key] = load_models(settings, device)
    return _run_shard(raw_tar, features_dir, settings, _MODEL_CACHE[cache_key], device)
