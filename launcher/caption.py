"""Caption images with an export: `python -m launcher.caption --export <dir> <inputs ...> [--beams N] [--out captions.jsonl|.csv] [--resume]`.

Inputs are image files, folders (every file under them, sorted; a dangling symlink gets a row too),
URL-list files (UTF-8 text, a byte-order mark allowed, whose first line is an http(s) URL: one URL
per line, `#` comments and blank lines skipped) and URLs. Each image is prepared as the features'
images were at ingestion (the export's features provenance: img2dataset's resize, padding and
alpha on white, re-encoding; `vlpdist.data.image_preparation`), then goes CLIP image tower (rebuilt
from the export's CLIP identity, its recorded preprocessing) -> folded mapper -> LM `generate`, in
batches, greedy (`--beams 1`) or beam search, on the GPU when there is one. Worker threads fetch,
decode and prepare one image each, so memory holds at most `--workers` full-size decodes and two
batches of prepared tensors, whatever the image size. A URL fetch has a per-read timeout and a
whole-fetch deadline. Every input gets one output row, in input order: `input`, `status` (`ok`,
`unreadable`, `not_an_image`, `download_failed`), `caption` (for `ok`) and `error` (why not). A bad
input is reported and skipped, never fatal. Rows are appended and flushed as each batch finishes,
so a crash leaves every finished row (a cut last line is dropped on `--resume`); `--resume` skips
the inputs already in the output, and an existing output is never replaced without it. Exit 0 when
some input was captioned (in this run or the resumed output), 1 when none was; bad arguments (no
export, a missing path, a CLIP other than the features') exit 2.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import functools
import http.client
import io
import json
import socket
import sys
import threading
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlpdist.errors import UserError, exit_on_user_error

URL_SCHEMES = ("http://", "https://")
OUTPUT_COLUMNS = ("input", "status", "caption", "error")
MAX_DOWNLOAD_BYTES = 64 << 20  # a larger "image" is refused rather than held in memory
URL_LIST_PROBE_BYTES = 4096


@dataclass
class Loaded:
    """One input after reading and preparing: its CLIP input tensor, or the status and error that stopped it."""

    source: str
    pixels: object = None  # (3, H, W) torch tensor when status is "ok": only the prepared image is held
    status: str = "ok"
    error: str = ""


@dataclass(frozen=True)
class FetchLimits:
    read_timeout_s: float  # each socket operation (connect, every read)
    deadline_s: float  # the whole fetch, redirects included: a server dripping bytes passes every read timeout


def is_url(text: str) -> bool:
    return text.startswith(URL_SCHEMES)


def read_url_list(path: Path) -> list[str] | None:
    """The entries of a URL-list file, or None when `path` is not one (its first line is no URL)."""
    with open(path, "rb") as handle:
        head = handle.read(URL_LIST_PROBE_BYTES)
    try:
        # Incremental: a character cut by the probe's end is not a decoding error; "-sig" drops a byte-order mark.
        first = codecs.getincrementaldecoder("utf-8-sig")().decode(head).lstrip().split("\n", 1)[0]
    except UnicodeDecodeError:
        return None  # binary: an image, or not, for the decoder to say
    if not is_url(first):
        return None
    lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def folder_entries(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted, and every dangling symlink (it gets a row saying so, not silence)."""
    return [entry for entry in sorted(folder.rglob("*")) if entry.is_file() or (entry.is_symlink() and not entry.exists())]


def expand_inputs(arguments: list[str]) -> list[tuple[str, str]]:
    """(kind "file" | "url", source) per input, in order; a path that does not exist is the user's error."""
    items: list[tuple[str, str]] = []
    for argument in arguments:
        path = Path(argument)
        if is_url(argument):
            items.append(("url", argument))
        elif path.is_dir():
            items.extend(("file", str(file)) for file in folder_entries(path))
        elif path.is_file():
            urls = read_url_list(path)
            items.extend([("url", url) for url in urls] if urls is not None else [("file", argument)])
        else:
            raise UserError(f"input {argument} does not exist (give image files, folders, URL-list files or URLs)")
    return items


class FetchDeadline:
    """Shuts down every socket of one fetch when its deadline passes, which wakes a read blocked on it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> FetchDeadline:
        self._timer.start()
        return self

    def __exit__(self, *_) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired.is_set():
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired.set()
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


class _DeadlineWatched:
    """Connection mixin: the fetch's deadline watches the socket from the moment it is connected (for HTTPS,
    the TLS socket its connect() wraps it in)."""

    def __init__(self, *args, deadline: FetchDeadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTPConnection(_DeadlineWatched, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_DeadlineWatched, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: FetchDeadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPConnection, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: FetchDeadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPSConnection, deadline=self.deadline), req, context=self._context)


def fetch_url(url: str, limits: FetchLimits) -> bytes:
    """The body of `url`, at most MAX_DOWNLOAD_BYTES, within `limits.deadline_s` for the whole fetch."""
    if not is_url(url):
        raise ValueError("not an http(s) URL")
    request = urllib.request.Request(url, headers={"User-Agent": "vlpdist-caption"})
    with FetchDeadline(limits.deadline_s) as deadline:
        opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))
        try:
            with opener.open(request, timeout=limits.read_timeout_s) as response:
                data = response.read(MAX_DOWNLOAD_BYTES + 1)
        except (OSError, http.client.HTTPException):
            if not deadline.expired.is_set():
                raise
        if deadline.expired.is_set():  # a shut-down socket reads as an early end: never take a cut body
            raise TimeoutError(f"whole-fetch deadline of {limits.deadline_s:g} s passed (--download-deadline)")
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def load_input(item: tuple[str, str], limits: FetchLimits, prepare: Callable[[bytes], object]) -> Loaded:
    """Read (or fetch), decode and prepare one input, keeping only the prepared tensor; never raises for a bad input."""
    import urllib.error

    from vlpdist.data.image_preparation import ImageRejected

    kind, source = item
    if kind == "url":
        try:
            data = fetch_url(source, limits)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            return Loaded(source, status="download_failed", error=f"{type(err).__name__}: {err}")
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            dangling = " (a dangling symlink)" if Path(source).is_symlink() and not Path(source).exists() else ""
            return Loaded(source, status="unreadable", error=f"{type(err).__name__}: {err}{dangling}")
    try:
        return Loaded(source, prepare(data))
    except ImageRejected as err:
        return Loaded(source, status=err.status, error=str(err))


def load_chunks(chunks: list[list[tuple[str, str]]], workers: int, limits: FetchLimits,
                prepare: Callable[[bytes], object]) -> Iterator[list[Loaded]]:
    """Each chunk of inputs loaded and prepared, in order; the next chunk loads in `workers` threads while the caller
    runs the models on this one (chunks may differ in size: the ask command loads each distinct image of a batch once).

    A worker holds one input's bytes and full-size decode at a time and returns only its prepared
    tensor, so at most `workers` full-size images and two chunks of tensors are alive at once."""
    with ThreadPoolExecutor(max_workers=workers) as pool:

        def submit(index: int) -> list:
            return [pool.submit(load_input, item, limits, prepare) for item in chunks[index]] if index < len(chunks) else []

        pending = submit(0)
        for index in range(len(chunks)):
            current = [future.result() for future in pending]
            pending = submit(index + 1)
            yield current


def load_in_batches(items: list[tuple[str, str]], batch_size: int, workers: int, limits: FetchLimits,
                    prepare: Callable[[bytes], object]) -> Iterator[list[Loaded]]:
    """Batches of `batch_size` prepared inputs, in order, loaded as `load_chunks` does."""
    return load_chunks([items[start : start + batch_size] for start in range(0, len(items), batch_size)], workers, limits, prepare)


@dataclass
class InferenceModels:
    """What turns a prepared image into text: the export's CLIP image tower, its captioner, and the preparation
    that makes an image what the features' images were at ingestion."""

    manifest: dict
    captioner: object
    clip_model: object
    prepare: object  # vlpdist.data.image_preparation.ImagePreparation
    device: str


def load_inference_models(export: str, device: str | None, beams: int) -> InferenceModels:
    """The export's models on `device` (default cuda when available); a `UserError` when its CLIP is not the
    features' or `beams` is more than its decoding allows."""
    import torch

    from vlpdist.data.image_preparation import inference_preparation
    from vlpdist.models.captioner import load_exported_captioner
    from vlpdist.models.clip_identity import build_clip_image_encoder
    from vlpdist.models.export_bundle import read_export_manifest

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_export_manifest(export)
    provenance = manifest.get("features_provenance")
    captioner = load_exported_captioner(export).to(device)
    if captioner.bottleneck_only and beams != 1:
        raise UserError("this export decodes through bottleneck tokens, which is greedy only: use --beams 1")
    clip_model, clip_transform = build_clip_image_encoder(manifest["clip"], export, device)
    prepare = inference_preparation(provenance, manifest["clip"], clip_transform, f"export {export}")
    return InferenceModels(manifest, captioner, clip_model, prepare, device)


def encode_prepared(good: list[Loaded], models: InferenceModels):
    """(B, C) CLIP features of prepared inputs, unit vectors, as ingestion computed the training features."""
    import torch

    from data_ingest.process.clip_model import encode_images

    images_B3HW = torch.stack([item.pixels for item in good])
    features_BC = torch.from_numpy(encode_images(models.clip_model, images_B3HW, models.device)).to(models.device)
    clip_dim = models.manifest["clip_dim"]
    if features_BC.shape[1] != clip_dim:
        raise UserError(f"the export's CLIP embeds into {features_BC.shape[1]} dims but its mapper reads {clip_dim}: "
                        "the export names the wrong CLIP (re-export with the process.clip_* that made the features)")
    return features_BC


def caption_batch(batch: list[Loaded], models: InferenceModels, max_new_tokens: int, beams: int) -> list[dict]:
    """Output rows for one batch: the prepared images captioned together, the others passed through."""
    good = [item for item in batch if item.status == "ok"]
    captions: dict[int, str] = {}
    if good:
        features_BC = encode_prepared(good, models)
        captions = {id(item): text for item, text in zip(good, models.captioner.generate_captions(features_BC, max_new_tokens, beams))}
    return [{"input": item.source, "status": item.status, "caption": captions.get(id(item)), "error": item.error or None}
            for item in batch]


def read_finished_rows(out: Path, columns: tuple[str, ...] = OUTPUT_COLUMNS, what: str = "caption") -> list[dict]:
    """The rows an earlier run left in `out` (`columns` each, a `what` command's output); a last line cut by a crash is
    removed from the file (it is this command's own output)."""
    text = out.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        with open(out, "r+", encoding="utf-8") as handle:
            handle.truncate(len(text[:cut].encode("utf-8")))
        text = text[:cut]
    if out.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if text and tuple(reader.fieldnames or ()) != columns:
            raise UserError(f"--resume: {out} is not a {what} output (its header is not {','.join(columns)})")
        return list(reader)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or set(row) != set(columns):
            raise UserError(f"--resume: line {number} of {out} is not a {what} row")
        rows.append(row)
    return rows


class RowWriter:
    """Appends rows to the output as batches finish, flushed, so a crash keeps every finished row.

    Appending (not a staged file renamed at the end) because at scale the point is what a crash at
    input 9,000 leaves: the rows done, which `--resume` reads back and skips."""

    def __init__(self, out: Path, columns: tuple[str, ...] = OUTPUT_COLUMNS):
        self.out = out
        self.columns = columns
        new = not out.exists() or out.stat().st_size == 0
        out.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(out, "a", encoding="utf-8", newline="")
        self.csv = csv.DictWriter(self.handle, fieldnames=columns) if out.suffix == ".csv" else None
        if self.csv is not None and new:
            self.csv.writeheader()
            self.handle.flush()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.csv is not None:
                self.csv.writerow({key: "" if row[key] is None else row[key] for key in self.columns})
            else:
                self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def add_run_arguments(parser: argparse.ArgumentParser, default_out: str, what: str) -> None:
    """The options the caption and ask commands share: decoding width, batching, output, device and fetching."""
    parser.add_argument("--beams", type=int, default=1, help="beam width; 1 = greedy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=default_out, help="output file, .jsonl or .csv (rows appended as they are done)")
    parser.add_argument("--resume", action="store_true", help=f"add to an existing --out, skipping the {what} it already has")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--download-timeout", type=float, default=10.0, help="seconds per socket operation of a URL fetch")
    parser.add_argument("--download-deadline", type=float, default=60.0, help="seconds for a whole URL fetch")
    parser.add_argument("--workers", type=int, default=8, help="threads fetching, decoding and preparing inputs")


def check_run_arguments(args: argparse.Namespace) -> Path:
    """The output path, once the shared options are valid and an existing output is resumed, never replaced."""
    out = Path(args.out)
    if out.suffix not in (".jsonl", ".csv"):
        raise UserError(f"--out {out}: the output is .jsonl or .csv")
    for flag, value in (("--beams", args.beams), ("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    for flag, seconds in (("--download-timeout", args.download_timeout), ("--download-deadline", args.download_deadline)):
        if not seconds > 0:
            raise UserError(f"{flag} must be more than 0 seconds, not {seconds}")
    if out.exists() and out.stat().st_size and not args.resume:
        raise UserError(f"--out {out} exists: pass --resume to add the missing inputs to it, or choose another --out")
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.caption", description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="export folder written by python -m launcher.export")
    parser.add_argument("inputs", nargs="+", help="image files, folders, URL-list files (one URL per line) or URLs")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's max_caption_tokens")
    add_run_arguments(parser, "captions.jsonl", "inputs")
    args = parser.parse_args(argv)
    out = check_run_arguments(args)
    finished = read_finished_rows(out) if args.resume and out.is_file() else []
    done = {row["input"] for row in finished}
    items = [item for item in expand_inputs(args.inputs) if item[1] not in done]

    from tqdm import tqdm

    models = load_inference_models(args.export, args.device, args.beams)
    max_new_tokens = args.max_new_tokens or models.manifest["model"]["max_caption_tokens"]
    limits = FetchLimits(args.download_timeout, args.download_deadline)
    if done:
        print(f"resuming {out}: {len(finished)} rows there, {len(items)} inputs to go", flush=True)
    print(models.prepare.describe(), flush=True)

    counts = Counter(row["status"] for row in finished)
    writer = RowWriter(out)
    try:
        with tqdm(total=len(items), desc="caption", unit="image") as progress:
            for batch in load_in_batches(items, args.batch_size, args.workers, limits, models.prepare):
                rows = caption_batch(batch, models, max_new_tokens, args.beams)
                writer.write(rows)
                counts.update(row["status"] for row in rows)
                progress.update(len(batch))
    finally:
        writer.close()
    return report_counts(counts, out, models.device, "captioned", "input")


def report_counts(counts: Counter, out: Path, device: object, done: str, noun: str) -> dict:
    """Print the rows' statuses (and, when none is ok, the one-line error of exit code 1); the run's result."""
    total = sum(counts.values())
    print(f"{done} {counts['ok']} of {total} {noun}s on {device} "
          f"({', '.join(f'{status} {count}' for status, count in sorted(counts.items()))}) -> {out}", flush=True)
    exit_code = 0 if counts["ok"] else 1
    if exit_code:
        print(f"error: no {noun} was {done} (see the error column of {out})", file=sys.stderr, flush=True)
    return {"rows": total, "counts": dict(counts), "out": str(out), "exit_code": exit_code}


if __name__ == "__main__":
    sys.exit(main()["exit_code"])
