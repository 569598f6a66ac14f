"""The caption command at scale: a whole-fetch deadline against a slow-drip server, images held only as
prepared tensors, rows appended as done and `--resume`, exit 1 when nothing was captioned, a URL list
with a byte-order mark, a dangling symlink in a folder."""

from __future__ import annotations

import http.server
import io
import json
import threading

import numpy as np
import pytest
from export_fixtures import trained_run
from PIL import Image

from launcher.caption import FetchLimits, expand_inputs, load_in_batches, load_input
from launcher.caption import main as caption_main
from launcher.export import main as export_main
from vlpdist.data.image_preparation import ImagePreparation


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def slow_drip_server():
    """127.0.0.1 server whose body arrives one byte per 50 ms for 20 s: every read is well under any socket timeout."""
    stop = threading.Event()

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "400")
            self.end_headers()
            try:
                for _ in range(400):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    if stop.wait(0.05):  # the drip's pace; the test waits on the fetch, not on this
                        return
            except OSError:  # the client hung up: what the deadline does
                return

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"
    stop.set()
    server.shutdown()
    thread.join()


@pytest.mark.timeout(120)
def test_slow_drip_url_fails_at_the_whole_fetch_deadline(slow_drip_server):
    loaded = load_input(("url", slow_drip_server), FetchLimits(read_timeout_s=10.0, deadline_s=1.0), prepare=lambda data: data)
    assert loaded.status == "download_failed" and loaded.pixels is None
    assert loaded.error == "TimeoutError: whole-fetch deadline of 1 s passed (--download-deadline)"


def test_url_list_with_a_byte_order_mark_and_a_dangling_symlink(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_bytes("\ufeffhttp://127.0.0.1:1/a.jpg\n# comment\nhttps://example.invalid/b.png\n".encode("utf-8"))
    assert expand_inputs([str(urls)]) == [("url", "http://127.0.0.1:1/a.jpg"), ("url", "https://example.invalid/b.png")]

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(8, 8))
    (folder / "b_gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    items = expand_inputs([str(folder)])
    assert items == [("file", str(folder / "a.jpg")), ("file", str(folder / "b_gone.jpg"))]
    loaded = load_input(items[1], FetchLimits(1.0, 1.0), prepare=lambda data: data)
    assert loaded.status == "unreadable" and "dangling symlink" in loaded.error


def test_workers_hand_back_prepared_tensors_only(tmp_path):
    """A 3000x2000 photo is decoded and prepared in the worker: the batch holds CLIP-sized tensors, no decoded image."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(size=(32, 32)), is_train=False)
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(3000, 2000))
    (tmp_path / "notes.txt").write_text("not an image")
    items = [("file", str(big)), ("file", str(tmp_path / "notes.txt")), ("file", str(big))]
    batches = list(load_in_batches(items, 2, 2, FetchLimits(1.0, 1.0), ImagePreparation(None, transform)))
    assert [[item.status for item in batch] for batch in batches] == [["ok", "not_an_image"], ["ok"]]
    for item in (batches[0][0], batches[1][0]):
        assert tuple(item.pixels.shape) == (3, 32, 32)
        assert set(vars(item)) == {"source", "pixels", "status", "error"}  # nothing else rides along


@pytest.mark.slow
def test_rows_are_appended_resume_skips_done_inputs_and_nothing_captioned_exits_1(tmp_path, tiny_lm, tiny_clip, capsys):
    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    export = tmp_path / "export"
    export_main(["--checkpoint", str(checkpoint), "--out", str(export)])
    images, out = tmp_path / "images", tmp_path / "captions.jsonl"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(40, 30, seed=1))
    (images / "b.txt").write_text("not an image")

    first = caption_main(["--export", str(export), str(images), "--out", str(out), "--batch-size", "1"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["exit_code"] == 0 and [row["status"] for row in rows] == ["ok", "not_an_image"]

    with pytest.raises(SystemExit) as refused:  # an existing output is never replaced without --resume
        caption_main(["--export", str(export), str(images), "--out", str(out)])
    assert refused.value.code == 2 and "pass --resume" in capsys.readouterr().err

    # A crash mid-row leaves a cut last line; a new image arrived meanwhile.
    with open(out, "a") as handle:
        handle.write('{"input": "cut')
    (images / "c.jpg").write_bytes(jpeg_bytes(30, 40, seed=2))
    resumed = caption_main(["--export", str(export), str(images), "--out", str(out), "--resume"])
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[:2] == rows and [row["input"] for row in again[2:]] == [str(images / "c.jpg")] and again[2]["status"] == "ok"
    assert resumed["rows"] == 3 and resumed["exit_code"] == 0

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.txt").write_text("still not an image")
    failed = caption_main(["--export", str(export), str(nothing), "--out", str(tmp_path / "failed.csv")])
    assert failed["exit_code"] == 1 and failed["counts"] == {"not_an_image": 1}
    assert "no input was captioned" in capsys.readouterr().err
    assert (tmp_path / "failed.csv").read_text().splitlines()[0] == "input,status,caption,error"
