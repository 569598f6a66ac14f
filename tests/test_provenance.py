"""The model sees at inference what it saw in training: the features' provenance manifest, written by
ingestion, carried by the run and the export, and the inference image preparation built from it.

A transparent PNG goes through the real download stage (loopback server -> img2dataset); the inference
preparation of the same file must equal what img2dataset wrote into the raw shard (and the PIL
reproduction must be within JPEG noise of it), never the original on black."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from export_fixtures import tiny_clip_provenance, trained_run
from PIL import Image, ImageDraw

from data_ingest.download import STATE_FILENAME, run_download
from data_ingest.process.run import features_provenance, refuse_other_provenance
from data_ingest.sources.demo_server import DemoImageServer
from launcher.caption import main as caption_main
from launcher.export import main as export_main
from vlpdist.config import load_config
from vlpdist.data.image_preparation import ImagePreparation
from vlpdist.data.provenance import PROVENANCE_FILE, build_provenance, copy_provenance, read_provenance, write_provenance
from vlpdist.errors import UserError
from vlpdist.models.clip_identity import describe_clip
from vlpdist.models.export_bundle import read_export_manifest


def red_circle_on_transparent(width: int = 120, height: int = 80) -> bytes:
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((20, 10, 70, 60), fill=(255, 0, 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ingested_png(tmp_path_factory):
    """The transparent PNG downloaded for real (one row, img2dataset, border mode at 64 px, JPEG q95): (root, config, the PNG, the JPEG written)."""
    import pandas as pd

    work = tmp_path_factory.mktemp("png_ingest")
    png = red_circle_on_transparent()
    with DemoImageServer({"img/circle.png": png}) as server:
        url_list = work / "urls.parquet"
        pd.DataFrame({"url": [f"{server.base_url}/img/circle.png"], "caption": ["a red circle"]}).to_parquet(url_list, index=False)
        config = load_config(None, [f"root={work / 'root'}", f"download.url_list={url_list}", "download.image_size=64",
                                    "download.resize_mode=border", "download.processes=1", "download.threads=1"])
        summary = run_download(config)
    assert summary["success"] == 1, summary
    with tarfile.open(work / "root" / "raw" / "00000.tar") as archive:
        written = next(archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".jpg"))
    return work / "root", config, png, written


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_transparent_png_is_prepared_as_ingestion_wrote_it(ingested_png, tiny_clip):
    root, config, png, written = ingested_png
    ingestion = json.loads((root / STATE_FILENAME).read_text())["image_preparation"]
    assert ingestion["recorded_by"] == "download" and ingestion["image_size"] == 64 and ingestion["resize_mode"] == "border"
    provenance = build_provenance(describe_clip("vlpdist-test-tiny-clip", str(tiny_clip))[0], ingestion)
    stored = pixels(Image.open(io.BytesIO(written)))

    exact = pixels(ImagePreparation(provenance, None).ingested(png))
    assert np.array_equal(exact, stored)  # img2dataset's own resizer: what ingestion wrote, bit for bit
    reproduced = pixels(ImagePreparation(provenance, None, use_img2dataset=False).ingested(png))
    assert reproduced.shape == stored.shape and np.abs(reproduced - stored).mean() < 3.0  # PIL: within JPEG noise
    # Transparent pixels and the border are white, as ingestion made them; the circle is red.
    for prepared in (exact, reproduced):
        assert prepared[2, 2].min() > 240 and prepared[-3, -3].min() > 240
        assert prepared[20, 20, 0] > 200 and prepared[20, 20, 1:].max() < 60
    # What the caption command did before: the original file on black, resized by CLIP alone.
    on_black = pixels(Image.open(io.BytesIO(png)).convert("RGB").resize((64, 43)))
    assert on_black[2, 2].max() == 0


def test_processing_records_the_download_stages_preparation_and_refuses_another(ingested_png, tiny_clip, tmp_path):
    root, config, _, _ = ingested_png
    config.process.clip_model, config.process.clip_pretrained = "vlpdist-test-tiny-clip", str(tiny_clip)
    provenance = features_provenance(config)
    assert provenance["ingestion"] == json.loads((root / STATE_FILENAME).read_text())["image_preparation"]
    assert provenance["clip"]["pretrained_sha256"] and provenance["processing"]["clip_transform"]["size"] == [32, 32]
    features = tmp_path / "features"
    write_provenance(features, provenance)
    refuse_other_provenance(features, provenance)  # the same CLIP and preparation: no complaint
    earlier = json.loads(json.dumps(provenance))
    earlier["ingestion"]["image_size"] = 128  # features already made from 128 px images
    write_provenance(features, earlier)
    with pytest.raises(UserError, match="another CLIP or image preparation"):
        refuse_other_provenance(features, provenance)


def test_manifest_round_trips_run_to_export_and_another_clip_is_refused(tmp_path, tiny_lm, tiny_clip, capsys):
    provenance = tiny_clip_provenance(tiny_clip, image_size=64)
    features, run = tmp_path / "features", tmp_path / "run"
    run.mkdir()
    write_provenance(features, provenance)
    assert copy_provenance(features, run) == provenance  # what training does at its set-up
    checkpoint, _ = trained_run(run, tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    assert read_export_manifest(tmp_path / "export")["features_provenance"] == provenance == read_provenance(run)
    # The caption command prepares a transparent PNG from the export's record.
    (tmp_path / "circle.png").write_bytes(red_circle_on_transparent())
    capsys.readouterr()
    report = caption_main(["--export", str(tmp_path / "export"), str(tmp_path / "circle.png"), "--out", str(tmp_path / "c.jsonl")])
    assert report["counts"] == {"ok": 1}
    assert "images prepared as ingestion did (img2dataset's own resizer: border to 64 px" in capsys.readouterr().out

    # Features from another checkpoint of the same architecture (same embed_dim): refused, one line, exit 2.
    other = json.loads(json.dumps(provenance))
    other["clip"]["pretrained_sha256"] = "0" * 64
    write_provenance(run, other)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export_other")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert "the features were made with" in err
    assert not (tmp_path / "export_other").exists()


def test_a_damaged_manifest_is_one_line(tmp_path):
    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"format": "vlpdist-features-provenance", "format_version": 1, "clip": {}}))
    with pytest.raises(UserError, match="'clip' must name"):
        read_provenance(tmp_path)
