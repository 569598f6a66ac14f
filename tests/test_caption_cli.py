"""`python -m launcher.caption` as a user runs it: a tiny export whose CLIP is a tiny open_clip model
saved locally, a folder with a real JPEG, a truncated JPEG and a text file, and a URL list served
by a real loopback HTTP server: one row per input with the right status, exit 0, JSONL and CSV."""

from __future__ import annotations

import csv
import http.server
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from common_fixtures import REPO
from export_fixtures import trained_run
from PIL import Image

from launcher.export import main as export_main
from vlpdist.models import load_exported_captioner
from vlpdist.models.clip_identity import build_clip_image_encoder
from vlpdist.models.export_bundle import read_export_manifest

# Two subprocesses (~6 s each: torch, transformers and open_clip imports) after the session's tiny LM.
pytestmark = pytest.mark.slow


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def export_dir(tmp_path, tiny_lm, tiny_clip) -> Path:
    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    return tmp_path / "export"


@pytest.fixture
def image_server(tmp_path):
    """127.0.0.1 HTTP server over a folder holding one JPEG; yields its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "photo.jpg").write_bytes(jpeg_bytes(3))
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def run_caption(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.caption", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def expected_caption(export_dir: Path, image_bytes: bytes) -> str:
    """The same image captioned in this process through the export's own CLIP and captioner (greedy)."""
    from data_ingest.process.clip_model import encode_images

    model, preprocess = build_clip_image_encoder(read_export_manifest(export_dir)["clip"], export_dir)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    features_BC = torch.from_numpy(encode_images(model, preprocess(image)[None], "cpu"))
    return load_exported_captioner(export_dir).generate_captions(features_BC, 12)[0]


def test_caption_folder_and_url_list(tmp_path, export_dir, image_server):
    images = tmp_path / "images"
    images.mkdir()
    photo = jpeg_bytes(0)
    (images / "photo.jpg").write_bytes(photo)
    (images / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    (images / "notes.txt").write_text("not an image\n")
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{image_server}/photo.jpg\n# a comment\n\n{image_server}/missing.jpg\n")

    result = run_caption("--export", str(export_dir), str(images), str(urls), "--batch-size", "2", "--out", str(tmp_path / "captions.jsonl"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [(Path(row["input"]).name, row["status"]) for row in rows] == [
        ("notes.txt", "not_an_image"), ("photo.jpg", "ok"), ("truncated.jpg", "unreadable"),
        ("photo.jpg", "ok"), ("missing.jpg", "download_failed"),
    ]
    assert rows[1]["caption"] == expected_caption(export_dir, photo) and rows[1]["error"] is None
    assert rows[3]["caption"] == expected_caption(export_dir, jpeg_bytes(3))
    assert "truncated" in rows[2]["error"] and "404" in rows[4]["error"]
    assert all(row["caption"] is None and row["error"] for row in rows if row["status"] != "ok")
    assert "captioned 2 of 5 inputs" in result.stdout and "caption: 100%" in result.stderr  # the tqdm bar

    beams = run_caption("--export", str(export_dir), str(images), "--beams", "3", "--out", str(tmp_path / "captions.csv"))
    assert beams.returncode == 0, beams.stderr
    with open(tmp_path / "captions.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(Path(row["input"]).name, row["status"]) for row in table] == [
        ("notes.txt", "not_an_image"), ("photo.jpg", "ok"), ("truncated.jpg", "unreadable")]
    assert table[1]["caption"] and table[1]["error"] == "" and table[0]["caption"] == "" and table[0]["error"]


def test_caption_user_errors_exit_2(tmp_path, export_dir):
    missing = run_caption("--export", str(export_dir), str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: input {tmp_path / 'nope'} does not exist " \
        "(give image files, folders, URL-list files or URLs)"
    (export_dir / "mapper.safetensors").write_bytes(b"")
    partial = run_caption("--export", str(export_dir), str(tmp_path), "--out", str(tmp_path / "x.jsonl"))
    assert partial.returncode == 2 and "is partial: mapper.safetensors has 0 bytes" in partial.stderr
    assert "Traceback" not in partial.stderr and not (tmp_path / "x.jsonl").exists()
