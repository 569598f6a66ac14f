"""The download stage for real: loopback HTTP server -> img2dataset -> webdataset shards.

The server keeps an access log, so the tests see exactly which URLs each run requested.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from common_fixtures import REPO

from data_ingest.download import SUMMARY_FILENAME, run_download
from data_ingest.sources.demo_server import DemoImageServer
from data_ingest.sources.synthetic import BROKEN_KINDS, broken_paths, demo_url_rows, generate_demo_samples
from vlpdist.config import Config, DemoDataConfig, load_config, save_config
from vlpdist.errors import UserError

DEMO = DemoDataConfig(num_samples=40, seed=3, broken_per_kind=1, slow_response_s=8.0)
FLAKY = ("img/000004.jpg", "img/000031.jpg")  # fail once with 503, then succeed


def _config(root: Path, url_list: Path, **download) -> Config:
    overrides = [f"root={root}", f"download.url_list={url_list}", "download.samples_per_shard=20",
                 "download.image_size=32", "download.processes=2", "download.threads=8", "download.timeout_s=4.0"]
    overrides += [f"download.{k}={v}" for k, v in download.items()]
    return load_config(None, overrides)


def _path_of(url: str) -> str:
    return url.split("/", 3)[3]


def _copy_of_first_pass(first_pass: dict, tmp_path: Path) -> tuple[Path, Config]:
    """The first pass's dataset root copied into `tmp_path / "root"`, and the same download config pointed at it."""
    root = tmp_path / "root"
    shutil.copytree(first_pass["config"].root, root)
    return root, _config(root, Path(first_pass["config"].download.url_list), extra_columns="[expected]")


def _retry_failed(config_file: Path) -> subprocess.CompletedProcess:
    """`python -m data_ingest.run --stage download --retry-failed` with this config file."""
    return subprocess.run(
        [sys.executable, "-m", "data_ingest.run", "--config", str(config_file), "--stage", "download", "--retry-failed"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def server():
    samples = generate_demo_samples(DEMO)
    with DemoImageServer({s.path: s.jpeg for s in samples}, broken_paths(DEMO), DEMO.slow_response_s, FLAKY) as srv:
        srv.samples = samples
        yield srv


@pytest.fixture(scope="module")
def first_pass(server, tmp_path_factory):
    """One real download of 46 rows (40 images + one URL of each broken kind) in 3 shards."""
    work = tmp_path_factory.mktemp("first_pass")
    rows = pd.DataFrame(demo_url_rows(server.samples, DEMO, server.base_url))
    url_list = work / "urls.parquet"
    rows[["url", "caption", "expected"]].to_parquet(url_list, index=False)
    config = _config(work / "root", url_list, extra_columns="[expected]")
    server.clear_log()
    summary = run_download(config)
    return {"config": config, "rows": rows, "summary": summary, "requested": server.requested_paths()}


def test_counts_add_up_and_every_broken_kind_has_its_reason(first_pass):
    summary, rows = first_pass["summary"], first_pass["rows"]
    assert summary["input_rows"] == len(rows) == 46
    assert summary["success"] + summary["failed"] == len(rows)
    assert summary["success"] == 40 - len(FLAKY)
    expected = {}
    for reason in BROKEN_KINDS.values():
        expected[reason] = expected.get(reason, 0) + DEMO.broken_per_kind
    expected["http_503"] = len(FLAKY)
    assert summary["failures_by_reason"] == expected
    assert summary["this_run"]["samples_per_s"] > 0
    on_disk = json.loads((Path(first_pass["config"].root) / SUMMARY_FILENAME).read_text())
    assert on_disk["failures_by_reason"] == expected


def test_shards_are_readable_with_webdataset(first_pass):
    raw = Path(first_pass["config"].root) / "raw"
    shards = sorted(str(p) for p in raw.glob("*.tar"))
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert len(samples) == first_pass["summary"]["success"]
    truth = dict(zip(first_pass["rows"]["url"], first_pass["rows"]["caption"]))
    for key, image, caption, meta in samples:
        assert image.size == (32, 32)
        assert caption == truth[meta["url"]]
        assert meta["expected"] == "success"  # extra columns travel into each sample's json


def test_every_url_was_requested_once(first_pass):
    requested = first_pass["requested"]
    assert sorted(requested) == sorted(_path_of(u) for u in first_pass["rows"]["url"])


def test_rerun_rebuilds_only_the_deleted_shard(first_pass, server, tmp_path):
    root, config = _copy_of_first_pass(first_pass, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "raw").glob("0000[02].*")}
    shard_rows = pd.read_parquet(root / "raw" / "00001.parquet")
    (root / "raw" / "00001.tar").unlink()

    server.clear_log()
    summary = run_download(config)

    assert sorted(server.requested_paths()) == sorted(_path_of(u) for u in shard_rows["url"])
    assert {p.name: p.stat().st_mtime_ns for p in (root / "raw").glob("0000[02].*")} == before
    assert (root / "raw" / "00001.tar").exists()
    assert summary["success"] + summary["failed"] == summary["input_rows"]
    assert summary["this_run"]["shards_built"] == 1


def test_rerun_of_a_finished_download_requests_nothing(first_pass, server, tmp_path):
    root, config = _copy_of_first_pass(first_pass, tmp_path)
    server.clear_log()
    summary = run_download(config)
    assert server.requested_paths() == []
    assert summary["failures_by_reason"] == first_pass["summary"]["failures_by_reason"]


def test_retry_failed_fetches_only_failed_rows_and_recovers_the_flaky_ones(first_pass, server, tmp_path):
    root, config = _copy_of_first_pass(first_pass, tmp_path)
    config_file = save_config(config, tmp_path)
    existing = {p.name: p.stat().st_mtime_ns for p in (root / "raw").iterdir()}
    failed_paths = sorted(
        _path_of(u) for u, e in zip(first_pass["rows"]["url"], first_pass["rows"]["expected"]) if e != "success"
    ) + sorted(FLAKY)

    server.clear_log()
    result = _retry_failed(config_file)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(server.requested_paths()) == sorted(failed_paths)

    summary = json.loads((root / SUMMARY_FILENAME).read_text())
    assert summary["recovered_by_retry"] == len(FLAKY)
    assert summary["success"] == 40
    assert "http_503" not in summary["failures_by_reason"]
    assert summary["success"] + summary["failed"] == 46
    assert summary["shards"]["retry"] == 1
    # Existing shards untouched; the recovered samples sit in a new shard.
    assert {n: m for n, m in ((p.name, p.stat().st_mtime_ns) for p in (root / "raw").iterdir()) if n in existing} == existing
    recovered = list(wds.WebDataset(str(root / "raw" / "00003.tar"), shardshuffle=False).to_tuple("__key__", "json"))
    assert sorted(json.loads(meta)["url"].split("/", 3)[3] for _, meta in recovered) == sorted(FLAKY)
    assert "ingestion summary" in result.stdout

    # A second retry asks only for the rows that still fail.
    server.clear_log()
    again = _retry_failed(config_file)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(server.requested_paths()) == sorted(failed_paths[: -len(FLAKY)])


def test_incomplete_shard_from_a_crash_is_rebuilt(first_pass, server, tmp_path):
    root, config = _copy_of_first_pass(first_pass, tmp_path)
    # A crash mid-shard leaves a tar without its stats file; img2dataset writes the stats last.
    (root / "raw" / "00002_stats.json").unlink()
    (root / "raw" / "00002.tar").write_bytes(b"partial")
    server.clear_log()
    summary = run_download(config)
    shard_rows = pd.read_parquet(root / "raw" / "00002.parquet")
    assert sorted(server.requested_paths()) == sorted(_path_of(u) for u in shard_rows["url"])
    assert summary["success"] + summary["failed"] == 46
    assert len(list(wds.WebDataset(str(root / "raw" / "00002.tar"), shardshuffle=False))) > 0


def test_a_raw_folder_not_written_by_a_download_is_refused_untouched(tmp_path):
    """Resuming deletes incomplete shards: without the download's state file, raw/ is not ours to resume."""
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    (tmp_path / "root" / "raw").mkdir(parents=True)
    (tmp_path / "root" / "raw" / "00000.tar").write_bytes(b"a user's archive")
    with pytest.raises(UserError, match="not an earlier download to resume"):
        run_download(_config(tmp_path / "root", url_list))
    assert (tmp_path / "root" / "raw" / "00000.tar").read_bytes() == b"a user's archive"
