"""URL lists in the formats and column conventions of LAION, CC3M and SBU; malformed lists fail cleanly."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from common_fixtures import REPO

from data_ingest.download import run_download
from data_ingest.sources.demo_server import DemoImageServer
from data_ingest.sources.synthetic import generate_demo_samples
from data_ingest.url_list import check_url_list
from vlpdist.config import DemoDataConfig, DownloadConfig, load_config
from vlpdist.errors import UserError


def _write(path: Path, frame: pd.DataFrame, fmt: str) -> Path:
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    return path


def _text(name: str, text: str):
    def make(folder: Path) -> Path:
        (folder / name).write_text(text)
        return folder / name

    return make


CONVENTIONS = {  # dataset: (format, url column, caption column, extra columns)
    "laion": ("parquet", "URL", "TEXT", ["similarity"]),
    "cc3m": ("tsv", "url", "caption", []),
    "sbu": ("jsonl", "image_url", "caption", []),
    "csv": ("csv", "link", "alt", ["source"]),
}


@pytest.mark.parametrize("name", CONVENTIONS)
def test_check_accepts_each_convention_and_counts_rows(tmp_path, name):
    fmt, url_col, caption_col, extras = CONVENTIONS[name]
    frame = pd.DataFrame({url_col: [f"http://x/{i}.jpg" for i in range(7)], caption_col: ["a cat"] * 7})
    for column in extras:
        frame[column] = 0.3
    path = _write(tmp_path / f"list.{fmt}", frame, fmt)
    checked = check_url_list(DownloadConfig(url_list=str(path), url_col=url_col, caption_col=caption_col, extra_columns=extras))
    assert checked.input_format == fmt and checked.rows == 7
    assert checked.shard_count(3) == 3


def test_folder_of_files_counts_shards_per_file(tmp_path):
    for i, n in enumerate((5, 2)):
        pd.DataFrame({"url": ["http://x/a.jpg"] * n, "caption": ["c"] * n}).to_parquet(tmp_path / f"part{i}.parquet")
    checked = check_url_list(DownloadConfig(url_list=str(tmp_path)))
    assert checked.rows == 7 and checked.shard_count(4) == 3  # img2dataset splits each file on its own


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: _write(d / "l.parquet", pd.DataFrame({"url": ["u"]}), "parquet"), "has no column 'caption'"),
        (_text("l.csv", ""), "is empty"),
        (_text("l.csv", "url,caption\n"), "has no rows"),
        (_text("l.xlsx", "x"), "unknown format '.xlsx'"),
        (_text("l.jsonl", '{"url": "u", "caption": "c"}\nnot json\n'), "line 2 is not valid JSON"),
        (_text("l.parquet", "PAR1garbage"), "cannot be read as parquet"),
        (lambda d: d / "absent.parquet", "does not exist"),
    ],
    ids=["missing-column", "empty-file", "header-only", "unknown-format", "bad-jsonl", "corrupt-parquet", "missing-file"],
)
def test_malformed_url_list_is_one_line_exit_2(tmp_path, setup, expected):
    path = setup(tmp_path)
    with pytest.raises(UserError, match=expected):
        check_url_list(DownloadConfig(url_list=str(path)))
    result = subprocess.run(
        [sys.executable, "-m", "data_ingest.run", "--config", "configs/demo.yaml",
         f"root={tmp_path / 'root'}", f"download.url_list={path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "root" / "raw").exists() or not any((tmp_path / "root" / "raw").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cc3m", "sbu"])
def test_real_download_from_tsv_and_jsonl_with_custom_columns(tmp_path, name):
    fmt, url_col, caption_col, _ = CONVENTIONS[name]
    samples = generate_demo_samples(DemoDataConfig(num_samples=6, seed=5))
    with DemoImageServer({s.path: s.jpeg for s in samples}) as server:
        frame = pd.DataFrame({caption_col: [s.caption for s in samples], url_col: [f"{server.base_url}/{s.path}" for s in samples]})
        frame.loc[len(frame)] = {caption_col: "gone", url_col: f"{server.base_url}/img/missing.jpg"}
        path = _write(tmp_path / f"list.{fmt}", frame, fmt)
        config = load_config(None, [f"root={tmp_path / 'root'}", f"download.url_list={path}", f"download.url_col={url_col}",
                                    f"download.caption_col={caption_col}", "download.image_size=32", "download.processes=1",
                                    "download.threads=4", "download.timeout_s=5"])
        summary = run_download(config)
    assert summary["input_rows"] == 7 and summary["success"] == 6
    assert summary["failures_by_reason"] == {"http_404": 1}
