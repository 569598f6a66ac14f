"""The run report (`launcher.report`, `vlpdist.report`): a demo-sized run built from the files each
stage writes (raw shards, decision files, feature shards, metrics.jsonl, TensorBoard events through
the training's own logger, eval.json, ablation.json), rendered and opened in headless Chromium;
partial runs; the size bound on a long run; sampling reads members, not shards. `--screenshot`
(and its one-line refusal without a browser), `--out` never replacing a file it did not write, and
`launcher.evaluate --report` on an export, opened in Chromium too."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from process_fixtures import write_raw_shards

from launcher.evaluate import main as evaluate_main
from launcher.export import main as export_main
from launcher.report import main as report_main
from vlpdist.config import Config, save_config
from vlpdist.errors import UserError
from vlpdist.report.browser import WINDOW_WIDTH, headless_chromium
from vlpdist.report.page import GENERATOR_META, PAGE_BOUND_BYTES, SECTIONS
from vlpdist.report.samples import thumbnails_for_keys

NAMES = ["circle", "square", "star", "diamond"]


def write_feature_shards(root: Path, raw_shards: list[Path], rng: random.Random, dim: int = 8) -> list[str]:
    """Feature shards and decision files for the raw shards (about 1 in 4 dropped), embeddings of width
    `dim` (a random unit vector per key, the same as image and caption); the kept keys."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from vlpdist.data.feature_format import encode_feature_sample

    features = root / "features"
    features.mkdir()
    keys = []
    for raw in raw_shards:
        rows = pq.read_table(raw.with_suffix(".parquet")).to_pylist()
        decisions = []
        with wds.TarWriter(str(features / raw.name)) as sink:
            for row in rows:
                score = rng.uniform(0.6, 0.95) if rng.random() > 0.25 else rng.uniform(-0.3, 0.6)
                kept = score >= 0.65
                decisions.append({"key": row["key"], "url": row["url"], "status": "written" if kept else "dropped", "reason": "",
                                  "decision": "keep" if kept else "drop", "web_clip": score, "web_kept": kept})
                if kept:
                    labels = sorted({rng.randrange(len(NAMES)) for _ in range(2)})
                    vector = np.random.default_rng(int(row["key"])).standard_normal(dim).astype(np.float32)
                    vector /= np.linalg.norm(vector)
                    sink.write(encode_feature_sample(row["key"], vector, vector[None], [row["caption"]], labels,
                                                     [NAMES[i] for i in labels], {"filter": "clip", "web_clip": score,
                                                                                  "synthetic_captions": ["a synthetic caption"]},
                                                     "keep", row["url"], row["caption"]))
                    keys.append(row["key"])
        pq.write_table(pa.Table.from_pylist(decisions), features / f"{raw.stem}_decisions.parquet")
    (features / "label_vocabulary.json").write_text(json.dumps({"names": NAMES, "fingerprint": "test"}))
    (features / "process_summary.json").write_text(json.dumps({"written": len(keys), "dropped_by_filter": 5, "failed": {"decode_error": 1}}))
    (root / "ingest_summary.json").write_text(json.dumps({"input_rows": 70, "success": 64, "failed": 6,
                                                          "failures_by_reason": {"http_404": 4, "timeout": 2}}))
    return keys


def write_training(run: Path, heldout_keys: list[str], steps: int, launches: tuple[int, ...] = (0, 30)) -> None:
    """metrics.jsonl, TensorBoard events of every launch (a resume at each later start), eval.json."""
    import torch

    from vlpdist.eval.scoring import heldout_retrieval
    from vlpdist.monitor.tensorboard import TensorBoardLogger
    from vlpdist.report.retrieval import retrieval_examples

    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as handle:
        for step in range(1, steps + 1):
            handle.write(json.dumps({"step": step, "cap": 2 / step ** 0.3, "itc": 4 - step / steps, "moe_aux": 2.0, "loss": 2.5 / step ** 0.3,
                                     "lr": 1e-3 * min(1, step / 20), "grad_norm": 1 + 1 / step, "nan_skipped": 0, "samples_seen": 32 * step,
                                     "epoch": 0}) + "\n")
    bounds = [*launches, steps]
    for start, end in zip(bounds, bounds[1:]):
        tb = TensorBoardLogger(run / "tb", True, purge_step=start + 1)
        tb.scalars({"data/left_out_per_epoch": 3}, start)
        for step in range(start + 10, end + 1, 10):
            tb.scalars({"throughput/samples_per_s": 900 + step % 7, "align/bank_fill": min(512, 32 * step),
                        "geodesic/known_fraction": 0.8, "geodesic/connected_components": 2, "geodesic/mean_degree": 12.0,
                        "geodesic/snapshot_step": step - step % 20}, step)
            tb.expert_load([0.3, 0.2, 0.25, 0.25], step)
        tb.close()
    generator = torch.Generator().manual_seed(0)
    keys = heldout_keys[:8]
    references = {key: [f"caption of {key}"] for key in keys}
    embeddings = {key: (torch.randn(8, generator=generator), torch.randn(1, 8, generator=generator)) for key in keys}
    evaluation = {"samples": len(keys), "caption_loss": 1.2, "lm_without_image_loss": 2.0,
                  "captioning": {"greedy": {"BLEU-4": 0.3, "CIDEr": 0.9}, "most-frequent caption": {"BLEU-4": 0.1, "CIDEr": 0.2}},
                  "reference_samples": len(keys),
                  "examples": [{"key": key, "references": references[key], "synthetic": [], "generated": "a red circle"} for key in keys],
                  **heldout_retrieval({"references": references, "embeddings": embeddings}),
                  "retrieval_examples": retrieval_examples(embeddings, references)}
    (run / "eval.json").write_text(json.dumps(evaluation))


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory):
    """A root as the demo leaves it (with an ablation under it), alignment on."""
    root = tmp_path_factory.mktemp("report") / "root"
    raw = write_raw_shards(root, 64, 32)
    heldout = write_feature_shards(root, raw, random.Random(0))
    config = Config()
    config.root, config.train.output_dir = str(root), str(root / "train")
    config.process.clip_threshold, config.align.itc_weight = 0.65, 0.1
    save_config(config, root)
    write_training(root / "train", heldout[-8:], steps=60)
    save_config(config, root / "train")
    (root / "ablation").mkdir()
    (root / "ablation" / "ablation.json").write_text(json.dumps({"rows": [
        {"variant": "caption", "description": "caption loss only", "seeds": [0, 1], "mean": {"CIDEr": 0.5}, "sd": {"CIDEr": 0.01}},
        {"variant": "itc", "description": "+ ITC", "seeds": [0, 1], "mean": {"CIDEr": 0.45}, "sd": {"CIDEr": 0.02}}]}))
    return root


def chromium_driver():
    """Headless Debian Chromium through its chromedriver (selenium), as `launcher.report --screenshot`
    starts it. Without them: a skip naming the packages, or a failure where CI is set (.ci/run installs them)."""
    try:
        return headless_chromium()
    except UserError as missing:
        if os.environ.get("CI"):
            pytest.fail(str(missing))
        pytest.skip(str(missing))


def assert_renders_cleanly(page: Path, sections: list[str], min_images: int):
    """Open `page` in Chromium: no console errors, at least `min_images` images and every one decoded,
    exactly `sections` present (in order). The driver, for more checks; the caller quits it."""
    driver = chromium_driver()
    try:
        driver.get(page.resolve().as_uri())
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        widths = driver.execute_script("return Array.from(document.images).map(image => image.complete ? image.naturalWidth : 0)")
        assert len(widths) >= min_images and min(widths) > 0
        present = driver.execute_script("return Array.from(document.querySelectorAll('section.present')).map(s => s.id)")
        assert present == sections
    except BaseException:
        driver.quit()
        raise
    return driver


def test_the_demo_sized_report_renders_in_chromium_with_every_section_and_image(demo_sized, tmp_path):
    out = report_main([str(demo_sized), "--out", str(tmp_path / "report.html")])
    page = out.read_text()
    assert "Every section present." in page and "<script" not in page and "http://" not in page.split("</style>")[1].replace(
        "http://www.w3.org/2000/svg", "").replace("http://127.0.0.1:1/", "")
    # filter grid (dropped + kept), held-out, retrieval
    driver = assert_renders_cleanly(out, [sid for sid, _ in SECTIONS], 8 + 8 + 8 + 4)
    try:
        assert driver.execute_script("return document.querySelectorAll('svg').length") >= 8
        assert driver.execute_script("return document.querySelectorAll('#training line.marker').length") >= 1  # the resume at 30
        page_height = driver.execute_script("return document.documentElement.scrollHeight")
    finally:
        driver.quit()
    # The screenshot beside the page, as the README's is made: the whole page, 1200 px wide; or its top.
    from PIL import Image

    screenshot = out.with_suffix(".png")
    assert report_main([str(demo_sized), "--out", str(out), "--screenshot", str(screenshot)]) == out  # its own page: replaced
    with Image.open(screenshot) as image:
        assert image.size == (WINDOW_WIDTH, page_height) and page_height > 2000
        assert sum(1 for count in image.convert("L").histogram() if count) > 20  # drawn, not a blank page
    report_main([str(demo_sized), "--out", str(out), "--screenshot", str(screenshot), "--screenshot-height", "700"])
    with Image.open(screenshot) as image:
        assert image.size == (WINDOW_WIDTH, 700)


def test_screenshot_without_a_browser_is_one_line_and_exit_2(demo_sized, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # a machine without chromium and chromedriver
    with pytest.raises(SystemExit) as exited:
        report_main([str(demo_sized), "--out", str(tmp_path / "report.html"), "--screenshot", str(tmp_path / "report.png")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: chromium and chromedriver not installed") and "apt-get install" in err
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "report.png").exists()


def test_out_replaces_its_own_page_and_refuses_anything_else(demo_sized, tmp_path, capsys):
    out = tmp_path / "report.html"
    report_main([str(demo_sized), "--out", str(out)])
    assert GENERATOR_META in out.read_text()[:512]
    out.write_text(out.read_text().replace("Every section present.", "an older page"))
    assert "Every section present." in report_main([str(demo_sized), "--out", str(out)]).read_text()  # its own: replaced

    notes = tmp_path / "notes.html"
    notes.write_text("<html><head><title>my notes</title></head><body>mine</body></html>")
    (tmp_path / "folder.html").mkdir()
    for target, what in ((notes, "a file"), (tmp_path / "folder.html", "a folder")):
        with pytest.raises(SystemExit) as exited:
            report_main([str(demo_sized), "--out", str(target)])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"error: --out {target} is {what} that is not a report vlpdist wrote") and "never overwritten" in err
    assert notes.read_text() == "<html><head><title>my notes</title></head><body>mine</body></html>"
    assert list((tmp_path / "folder.html").iterdir()) == []


def _sections(page: str) -> dict[str, str]:
    return {sid: page.split(f'<section id="{sid}" class="')[1].split('"')[0] for sid, _ in SECTIONS}


def test_partial_runs_name_each_missing_section_and_why(demo_sized, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(demo_sized, root)
    (root / "train" / "eval.json").unlink()
    shutil.rmtree(root / "ablation")
    with open(root / "train" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 61, "cap": 1.')  # a run killed mid-write
    config = Config()
    config.root, config.train.output_dir, config.align.itc_weight = str(root), str(root / "train"), 0.0
    save_config(config, root)
    save_config(config, root / "train")
    page = report_main([str(root / "train")]).read_text()  # the run folder, not the root
    state = _sections(page)
    assert state == {"ingestion": "present", "filter": "present", "labels": "present", "training": "present",
                     "heldout": "missing", "retrieval": "missing", "bank": "missing", "ablation": "missing"}
    assert "alignment is off" in page and "eval.json" in page and "1 unreadable lines" in page
    assert "Sections missing: Held-out captions" in page

    (root / "train" / "metrics.jsonl").write_text("not json\n")
    shutil.rmtree(root / "train" / "tb")
    (root / "features" / "label_vocabulary.json").write_text("{")
    state = _sections(report_main([str(root)]).read_text())
    assert state["training"] == "missing" and state["labels"] == "missing" and state["ingestion"] == "present"


def test_a_long_run_gives_a_page_within_the_bound(tmp_path):
    root = tmp_path / "root"
    raw = write_raw_shards(root, 64, 32)
    heldout = write_feature_shards(root, raw, random.Random(1))
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in range(2, 202):  # 200 more shards' decisions, 2,000 rows each: a big ingestion's files
        rows = {"key": [f"{shard:05d}{i:04d}" for i in range(2000)], "status": ["written", "dropped"] * 1000,
                "web_clip": [i / 2000 for i in range(2000)]}
        pq.write_table(pa.table(rows), root / "features" / f"{shard:05d}_decisions.parquet")
    config = Config()
    config.root, config.train.output_dir = str(root), str(root / "train")
    save_config(config, root)
    write_training(root / "train", heldout, steps=100_000, launches=(0, 99_000))
    page = report_main([str(root)]).read_text()
    assert len(page.encode()) < PAGE_BOUND_BYTES
    curves = [piece.split('points="')[1].split('"')[0] for piece in page.split("<polyline")[1:]]
    assert curves and all(curve.count(",") <= 400 for curve in curves)
    assert "from 64 of 202 shards" in page


def test_thumbnails_read_the_members_asked_for_not_the_shard(tmp_path):
    """/proc/self/io's rchar counts the bytes every read call returned: an index of headers and three
    images, not the 60 MB of the shard."""
    import webdataset as wds

    raw = tmp_path / "raw"
    raw.mkdir()
    image = (write_raw_shards(tmp_path / "small", 1, 1)[0])
    import tarfile

    with tarfile.open(image) as tar:
        jpeg = tar.extractfile(next(m for m in tar if m.name.endswith(".jpg"))).read()
    padding = os.urandom(64 * 1024)
    with wds.TarWriter(str(raw / "00000.tar")) as sink:
        for index in range(1000):
            sink.write({"__key__": f"00000{index:04d}", "jpg": jpeg, "bin": padding})
    size = (raw / "00000.tar").stat().st_size

    def read_bytes() -> int:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])

    before = read_bytes()
    found = thumbnails_for_keys(raw, ["000000007", "000000500", "000000999"])
    assert sorted(found) == ["000000007", "000000500", "000000999"]
    assert read_bytes() - before < size / 10  # headers: ~1.5 KB of each 66 KB member


def test_evaluate_report_shows_an_exports_heldout_captions_and_retrievals(tmp_path, tiny_lm, tiny_clip, capsys):
    """`launcher.evaluate --report` on an export over the held-out feature shard of a data root: the
    page's two sections read the evaluation (greedy and beam captions beside references and the raw
    shards' images, scores beside the most-frequent-caption baseline, top-5 retrievals), in Chromium."""
    from export_fixtures import CLIP_DIM, trained_run

    checkpoint, _ = trained_run(tmp_path / "run", tiny_lm, tiny_clip, tuned=False)
    export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    root = tmp_path / "root"
    write_feature_shards(root, write_raw_shards(root, 24, 12), random.Random(0), dim=CLIP_DIM)
    page = tmp_path / "eval_report.html"
    result = evaluate_main(["--model", str(tmp_path / "export"), "--features", str(root / "features" / "00001.tar"),
                            "--train-features", str(root / "features" / "00000.tar"), "--beams", "2", "--no-spice",
                            "--out", str(tmp_path / "eval.json"), "--report", str(page)])
    assert f"report written to {page}" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["retrieval_examples"] == result["retrieval_examples"]
    assert len(result["retrieval_examples"]) == 4 and all(len(ex["top"]) == 5 for ex in result["retrieval_examples"])
    text = page.read_text()
    assert GENERATOR_META in text[:512] and "image not found" not in text
    shown = result["captions"][:8]
    for row in shown:
        assert f"greedy: {row['greedy']}" in text and f"beam: {row['beam']}" in text and f"ref: {row['references'][0]}" in text
    assert "<td>most-frequent caption</td>" in text and "<td>beam 2</td>" in text and "R@10" in text
    driver = assert_renders_cleanly(page, ["heldout", "retrieval"], len(shown) + 4)
    driver.quit()

    # Its own earlier page is replaced; any other file at --report is refused before the model is loaded.
    (tmp_path / "mine.html").write_text("mine")
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--model", str(tmp_path / "missing"), "--features", str(root / "features"), "--report", str(tmp_path / "mine.html")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: --report {tmp_path / 'mine.html'} is a file that is not a report")
    assert (tmp_path / "mine.html").read_text() == "mine"


def test_a_sample_written_for_its_question_alone_counts_as_dropped_by_the_filter(tmp_path):
    """With questions, a sample whose web caption the filter drops is still written (decision question_only,
    status written, web_kept false): the histogram and the grid count it as dropped, not kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlpdist.report.page import RunFiles, _decision_rows

    (tmp_path / "features").mkdir()
    rows = [{"key": "0", "status": "written", "decision": "keep_web", "web_clip": 0.9, "web_kept": True},
            {"key": "1", "status": "written", "decision": "question_only", "web_clip": 0.1, "web_kept": False},
            {"key": "2", "status": "dropped", "decision": "drop", "web_clip": 0.2, "web_kept": False},
            {"key": "3", "status": "failed", "decision": "", "web_clip": None, "web_kept": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "features" / "00000_decisions.parquet")
    verdicts = {row["key"]: row["verdict"] for row in _decision_rows(RunFiles(tmp_path, None))[0]}
    assert verdicts == {"0": "kept", "1": "dropped", "2": "dropped", "3": "failed"}
