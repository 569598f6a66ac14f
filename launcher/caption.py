"""Caption images with an export: `python -m launcher.caption --export <dir> <inputs ...> [--beams N] [--out captions.jsonl|.csv]`.

Inputs are image files, folders (every file under them, sorted), URL-list files (text whose first
line is an http(s) URL: one URL per line, `#` comments and blank lines skipped) and URLs. Each
image goes CLIP image tower (rebuilt from the export's CLIP identity, its recorded preprocessing)
-> folded mapper -> LM `generate`, in batches, greedy (`--beams 1`) or beam search, on the GPU
when there is one. Every input gets one output row, in input order: `input`, `status`
(`ok`, `unreadable`, `not_an_image`, `download_failed`), `caption` (for `ok`) and `error` (why
not). A bad input is reported and skipped, never fatal; the output is written atomically at the
end and the command exits 0 when it ran. Bad arguments (no export, a missing path) exit 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vlpdist.errors import UserError, exit_on_user_error

URL_SCHEMES = ("http://", "https://")
OUTPUT_COLUMNS = ("input", "status", "caption", "error")
MAX_DOWNLOAD_BYTES = 64 << 20  # a larger "image" is refused rather than held in memory
URL_LIST_PROBE_BYTES = 4096


@dataclass
class Loaded:
    """One input after reading and decoding: an RGB image, or the status and error that stopped it."""

    source: str
    image: object = None  # PIL.Image.Image when status is "ok"
    status: str = "ok"
    error: str = ""


def is_url(text: str) -> bool:
    return text.startswith(URL_SCHEMES)


def read_url_list(path: Path) -> list[str] | None:
    """The entries of a URL-list file, or None when `path` is not one (its first line is no URL)."""
    with open(path, "rb") as handle:
        head = handle.read(URL_LIST_PROBE_BYTES)
    try:
        first = head.decode("utf-8").lstrip().split("\n", 1)[0]
    except UnicodeDecodeError:
        return None  # binary: an image, or not, for the decoder to say
    if not is_url(first):
        return None
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def expand_inputs(arguments: list[str]) -> list[tuple[str, str]]:
    """(kind "file" | "url", source) per input, in order; a path that does not exist is the user's error."""
    items: list[tuple[str, str]] = []
    for argument in arguments:
        path = Path(argument)
        if is_url(argument):
            items.append(("url", argument))
        elif path.is_dir():
            items.extend(("file", str(file)) for file in sorted(path.rglob("*")) if file.is_file())
        elif path.is_file():
            urls = read_url_list(path)
            items.extend([("url", url) for url in urls] if urls is not None else [("file", argument)])
        else:
            raise UserError(f"input {argument} does not exist (give image files, folders, URL-list files or URLs)")
    return items


def fetch_url(url: str, timeout_s: float) -> bytes:
    import urllib.request

    if not is_url(url):
        raise ValueError("not an http(s) URL")
    request = urllib.request.Request(url, headers={"User-Agent": "vlpdist-caption"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def decode_image(source: str, data: bytes) -> Loaded:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes the whole file: a truncated one fails here, not in the batch
            return Loaded(source, image.convert("RGB"))
    except UnidentifiedImageError:
        return Loaded(source, status="not_an_image", error="not an image file PIL can identify")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Loaded(source, status="unreadable", error=f"{type(err).__name__}: {err}")


def load_input(item: tuple[str, str], timeout_s: float) -> Loaded:
    """Read (or fetch) and decode one input; never raises for a bad input."""
    import http.client
    import urllib.error

    kind, source = item
    if kind == "url":
        try:
            data = fetch_url(source, timeout_s)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            return Loaded(source, status="download_failed", error=f"{type(err).__name__}: {err}")
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            return Loaded(source, status="unreadable", error=f"{type(err).__name__}: {err}")
    return decode_image(source, data)


def load_in_batches(items: list[tuple[str, str]], batch_size: int, workers: int, timeout_s: float) -> Iterator[list[Loaded]]:
    """Batches of loaded inputs, in order; the next batch loads in threads while the caller runs the models."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
        pending = [pool.submit(load_input, item, timeout_s) for item in chunks[0]] if chunks else []
        for index in range(len(chunks)):
            current = [future.result() for future in pending]
            pending = [pool.submit(load_input, item, timeout_s) for item in chunks[index + 1]] if index + 1 < len(chunks) else []
            yield current


def caption_batch(batch: list[Loaded], clip_model, preprocess, captioner, clip_dim: int, device: str,
                  max_new_tokens: int, beams: int) -> list[dict]:
    """Output rows for one batch: the decoded images captioned together, the others passed through."""
    import torch

    from data_ingest.process.clip_model import encode_images

    good = [item for item in batch if item.status == "ok"]
    captions: dict[int, str] = {}
    if good:
        images_B3HW = torch.stack([preprocess(item.image) for item in good])
        # (B, C) unit vectors, as ingestion computed the training features (encode_image, normalised).
        features_BC = torch.from_numpy(encode_images(clip_model, images_B3HW, device)).to(device)
        if features_BC.shape[1] != clip_dim:
            raise UserError(f"the export's CLIP embeds into {features_BC.shape[1]} dims but its mapper reads {clip_dim}: "
                            "the export names the wrong CLIP (re-export with the process.clip_* that made the features)")
        captions = {id(item): text for item, text in zip(good, captioner.generate_captions(features_BC, max_new_tokens, beams))}
    return [{"input": item.source, "status": item.status, "caption": captions.get(id(item)), "error": item.error or None}
            for item in batch]


def write_rows(rows: list[dict], out: Path) -> None:
    """All rows into `out` at once (JSON lines, or CSV with empty cells for no value), atomically."""
    from vlpdist.atomic import atomic_write_text

    text = io.StringIO(newline="")
    if out.suffix == ".csv":
        writer = csv.DictWriter(text, fieldnames=OUTPUT_COLUMNS)
        writer.writeheader()
        writer.writerows({key: "" if row[key] is None else row[key] for key in OUTPUT_COLUMNS} for row in rows)
    else:
        text.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(out, text.getvalue())


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.caption", description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="export folder written by python -m launcher.export")
    parser.add_argument("inputs", nargs="+", help="image files, folders, URL-list files (one URL per line) or URLs")
    parser.add_argument("--beams", type=int, default=1, help="beam width; 1 = greedy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's max_caption_tokens")
    parser.add_argument("--out", default="captions.jsonl", help="output file, .jsonl or .csv")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--download-timeout", type=float, default=10.0, help="seconds per URL fetch")
    parser.add_argument("--workers", type=int, default=8, help="threads reading and fetching inputs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".jsonl", ".csv"):
        raise UserError(f"--out {out}: the output is .jsonl or .csv")
    for flag, value in (("--beams", args.beams), ("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    items = expand_inputs(args.inputs)

    import torch
    from tqdm import tqdm

    from vlpdist.models.captioner import load_exported_captioner
    from vlpdist.models.clip_identity import build_clip_image_encoder
    from vlpdist.models.export_bundle import read_export_manifest

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = read_export_manifest(args.export)
    captioner = load_exported_captioner(args.export).to(device)
    if captioner.bottleneck_only and args.beams != 1:
        raise UserError("this export decodes through bottleneck tokens, which is greedy only: use --beams 1")
    clip_model, preprocess = build_clip_image_encoder(manifest["clip"], args.export, device)
    max_new_tokens = args.max_new_tokens or manifest["model"]["max_caption_tokens"]

    rows: list[dict] = []
    with tqdm(total=len(items), desc="caption", unit="image") as progress:
        for batch in load_in_batches(items, args.batch_size, args.workers, args.download_timeout):
            rows.extend(caption_batch(batch, clip_model, preprocess, captioner, manifest["clip_dim"], device,
                                      max_new_tokens, args.beams))
            progress.update(len(batch))
    write_rows(rows, out)
    counts = Counter(row["status"] for row in rows)
    print(f"captioned {counts['ok']} of {len(rows)} inputs on {device} "
          f"({', '.join(f'{status} {count}' for status, count in sorted(counts.items()))}) -> {out}", flush=True)
    return {"rows": len(rows), "counts": dict(counts), "out": str(out)}


if __name__ == "__main__":
    main()
