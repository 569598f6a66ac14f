"""The download stage: img2dataset turns a URL list into webdataset shards under `<root>/raw`.

img2dataset does the downloading, resizing and shard writing (the library, not a copy). This
module adds what a researcher needs on top of it:

* a run summary in which every input row ends in exactly one state (success, or a failure
  reason) and the counts add up to the input rows;
* resume: a shard is finished when its `NNNNN_stats.json` exists next to its tar and parquet
  (img2dataset writes the stats last); incomplete or partly deleted shards are cleared so
  img2dataset rebuilds exactly those;
* `retry_failed`: only the rows whose final state is a failure are fetched again, into new
  shards (img2dataset's `extend` mode) that never touch the existing ones. Each retried row keeps
  its original key in the `vlpdist_source_key` column, which is how the summary follows it.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

from data_ingest.url_list import UrlList, check_url_list
from vlpdist.atomic import atomic_write_bytes, atomic_write_json
from vlpdist.config import Config
from vlpdist.data.question_answer import QA_FIELDS
from vlpdist.data.provenance import INGESTION_KEYS, ingestion_preparation, resizer_arguments
from vlpdist.errors import UserError

RAW_DIRNAME = "raw"
STATE_FILENAME = "ingest_state.json"  # beside raw/: img2dataset treats every raw/*.json as a stats file
SUMMARY_FILENAME = "ingest_summary.json"
SOURCE_KEY_COLUMN = "vlpdist_source_key"
SHARD_PARTS = (".tar", ".parquet", "_stats.json")

_REASON_PATTERNS = (
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out|timeout", re.I), lambda m: "timeout"),
    (re.compile(r"!buf\.empty\(\)"), lambda m: "empty_body"),
    (re.compile(r"Image decoding error|cannot identify image", re.I), lambda m: "decode_error"),
    (re.compile(r"X-Robots-Tag", re.I), lambda m: "opted_out"),
    (re.compile(r"hash mismatch", re.I), lambda m: "hash_mismatch"),
    (re.compile(r"too small|too large|aspect ratio", re.I), lambda m: "filtered_by_size"),
    (re.compile(r"Errno 111|Connection refused|Connection reset|Remote end closed", re.I), lambda m: "connection_error"),
    (re.compile(r"Name or service not known|getaddrinfo|nodename", re.I), lambda m: "dns_error"),
    (re.compile(r"unknown url type|no host given|URL can't contain", re.I), lambda m: "bad_url"),
)


def failure_reason(error_message: str | None) -> str:
    """Map img2dataset's free-text error message to a short, countable reason."""
    message = error_message or ""
    for pattern, name in _REASON_PATTERNS:
        match = pattern.search(message)
        if match:
            return name(match)
    return "other"


def raw_dir(config: Config) -> Path:
    return Path(config.root) / RAW_DIRNAME


def list_raw_shards(config: Config) -> list[Path]:
    """The raw shard tars under `<root>/raw`, in shard order; a user error if there are none."""
    shards = sorted(raw_dir(config).glob("*.tar"))
    if not shards:
        raise UserError(f"no raw shards in {raw_dir(config)}: run the download stage first")
    return shards


_SHARD_FILE = re.compile(r"(\d+)(\.tar|\.parquet|_stats\.json)")


def _shard_ids(folder: Path) -> dict[int, set[str]]:
    """Shard id -> which of its parts (".tar", ".parquet", "_stats.json") exist in `folder`."""
    present: dict[int, set[str]] = {}
    for path in folder.iterdir() if folder.exists() else ():
        match = _SHARD_FILE.fullmatch(path.name)
        if match:
            present.setdefault(int(match.group(1)), set()).add(match.group(2))
    return present


def finished_shards(folder: Path) -> list[int]:
    """Shard ids whose tar, parquet and stats are all present."""
    return sorted(s for s, parts in _shard_ids(folder).items() if set(SHARD_PARTS) <= parts)


def clear_incomplete_shards(folder: Path) -> list[int]:
    """Delete what is left of shards that did not finish (or lost a file); return their ids."""
    cleared = []
    for shard, parts in sorted(_shard_ids(folder).items()):
        if set(SHARD_PARTS) <= parts:
            continue
        for suffix in SHARD_PARTS:
            (folder / f"{shard:05d}{suffix}").unlink(missing_ok=True)
        cleared.append(shard)
    shutil.rmtree(folder / "_tmp", ignore_errors=True)  # img2dataset's input split of a crashed run
    return cleared


def _run_img2dataset(url_location: Path, input_format: str, output: Path, config: Config, *,
                     url_col: str, caption_col: str, extra_columns: list[str], incremental_mode: str) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations
    from img2dataset import download

    dl = config.download
    if dl.distributor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    download(
        url_list=str(url_location),
        output_folder=str(output),
        input_format=input_format,
        output_format="webdataset",
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=list(extra_columns) or None,
        # What the features' provenance records (vlpdist.data.provenance), passed whole so the record is what ran.
        **resizer_arguments(ingestion_preparation(dl, recorded_by="download")),
        number_sample_per_shard=dl.samples_per_shard,
        processes_count=dl.processes,
        thread_count=dl.threads,
        timeout=dl.timeout_s,
        retries=dl.retries,
        distributor=dl.distributor,
        incremental_mode=incremental_mode,
        user_agent_token=dl.user_agent_token,
        disallowed_header_directives=list(dl.disallowed_header_directives),
    )


def comparable(key: str, value):
    """What must agree between runs on one root: the image preparation's settings, not the img2dataset version that recorded them."""
    return {name: value[name] for name in INGESTION_KEYS} if key == "image_preparation" else value


def _load_state(config: Config, url_list: UrlList) -> dict:
    """The facts about the original URL list that later runs (and retries) must agree with."""
    import json

    state_path = Path(config.root) / STATE_FILENAME
    state = {
        "url_list": str(url_list.location),
        "input_rows": url_list.rows,
        "samples_per_shard": config.download.samples_per_shard,
        "original_shards": url_list.shard_count(config.download.samples_per_shard),
        "rows_per_file": [f.rows for f in url_list.files],
        "retry_rounds": 0,
        # Read by the processing stage into the features' provenance: how img2dataset prepared every image.
        "image_preparation": ingestion_preparation(config.download, recorded_by="download"),
    }
    if state_path.exists():
        previous = json.loads(state_path.read_text())
        compared = ("input_rows", "samples_per_shard", "rows_per_file", "image_preparation")
        for key in (key for key in compared if key in previous):  # a root from before the record: its shards say nothing
            if comparable(key, previous[key]) != comparable(key, state[key]):
                raise UserError(
                    f"{config.root} was ingested from a different URL list, shard size or image preparation ({key}: "
                    f"{previous.get(key)} then, {state[key]} now); use a new download root"
                )
        state["retry_rounds"] = previous.get("retry_rounds", 0)
    return state


def _expected_rows_per_original_shard(state: dict) -> dict[int, int]:
    expected, shard, per_shard = {}, 0, state["samples_per_shard"]
    for rows in state["rows_per_file"]:
        for start in range(0, rows, per_shard):
            expected[shard] = min(per_shard, rows - start)
            shard += 1
    return expected


def read_row_states(folder: Path, state: dict):
    """One row per original input row: key, url, caption, extras, final status and reason.

    Original shards hold every input row once; retry shards (ids past the original ones) hold
    re-fetches, linked back by `vlpdist_source_key`. A later success wins over an earlier failure.
    """
    import pandas as pd

    n_original = state["original_shards"]
    done = finished_shards(folder)
    original = [pd.read_parquet(folder / f"{s:05d}.parquet") for s in done if s < n_original]
    rows = pd.concat(original, ignore_index=True) if original else pd.DataFrame(columns=["key", "status", "error_message"])
    rows["reason"] = [
        "success" if status == "success" else failure_reason(message)
        for status, message in zip(rows["status"], rows["error_message"])
    ]
    rows["recovered"] = False
    rows = rows.set_index("key", drop=False)
    for shard in (s for s in done if s >= n_original):
        retry = pd.read_parquet(folder / f"{shard:05d}.parquet", columns=[SOURCE_KEY_COLUMN, "status", "error_message"])
        for source_key, status, message in zip(retry[SOURCE_KEY_COLUMN], retry["status"], retry["error_message"]):
            if source_key not in rows.index or rows.at[source_key, "reason"] == "success":
                continue
            if status == "success":
                rows.at[source_key, "reason"] = "success"
                rows.at[source_key, "recovered"] = True
            else:
                rows.at[source_key, "reason"] = failure_reason(message)
    return rows


def summarize(folder: Path, state: dict, run_stats: dict) -> dict:
    rows = read_row_states(folder, state)
    reasons = Counter(rows["reason"])
    successes = reasons.pop("success", 0)
    done = set(finished_shards(folder))
    expected = _expected_rows_per_original_shard(state)
    missing = sum(n for shard, n in expected.items() if shard not in done)
    if missing:
        reasons["missing_shard"] = missing
    failed = sum(reasons.values())
    summary = {
        "input_rows": state["input_rows"],
        "success": successes,
        "failed": failed,
        "failures_by_reason": dict(sorted(reasons.items())),
        "recovered_by_retry": int(rows["recovered"].sum()),
        "shards": {"original": state["original_shards"], "retry": sum(1 for s in done if s >= state["original_shards"])},
        "this_run": run_stats,
    }
    if successes + failed != state["input_rows"]:
        raise RuntimeError(f"ingestion accounting is broken: {successes} + {failed} != {state['input_rows']} rows")
    return summary


def format_summary(summary: dict) -> str:
    run = summary["this_run"]
    lines = [
        f"ingestion summary: {summary['input_rows']} rows in, {summary['success']} succeeded, "
        f"{summary['failed']} failed ({summary['recovered_by_retry']} recovered by retry)",
    ]
    for reason, count in summary["failures_by_reason"].items():
        lines.append(f"  failed {reason:<18} {count}")
    lines.append(
        f"  this run: {run['rows_attempted']} rows fetched in {run['seconds']:.1f} s "
        f"({run['rows_per_s']:.1f} rows/s, {run['samples_per_s']:.1f} samples/s written)"
    )
    return "\n".join(lines)


def run_download(config: Config, retry_failed: bool = False) -> dict:
    """Run (or resume) the download stage; with `retry_failed`, re-fetch only failed rows."""
    url_list = check_url_list(config.download)
    folder = raw_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    # The state file is written before img2dataset writes anything: without it, what raw/ holds is not
    # an earlier download of ours, and resuming would delete its "incomplete shards".
    if not (Path(config.root) / STATE_FILENAME).is_file() and any(folder.iterdir()):
        raise UserError(f"{folder} holds files but {Path(config.root) / STATE_FILENAME} does not exist: not an earlier "
                        "download to resume; choose a new root (or empty raw/)")
    state = _load_state(config, url_list)
    cleared = clear_incomplete_shards(folder)
    if cleared:
        print(f"rebuilding incomplete shards: {', '.join(f'{s:05d}' for s in cleared)}", flush=True)
    atomic_write_json(Path(config.root) / STATE_FILENAME, state)

    before = set(finished_shards(folder))
    started = time.perf_counter()
    missing_original = [s for s in range(state["original_shards"]) if s not in before]
    if missing_original:
        print(f"downloading {len(missing_original)} of {state['original_shards']} shards into {folder}", flush=True)
        _run_img2dataset(
            url_list.location, url_list.input_format, folder, config,
            url_col=config.download.url_col, caption_col=config.download.caption_col,
            extra_columns=_with_question_columns(config.download.extra_columns, url_list.question_columns),
            incremental_mode="incremental",
        )
    else:
        print(f"all {state['original_shards']} shards of {folder} are finished", flush=True)

    if retry_failed:
        _retry_failed_rows(config, folder, state)

    built = sorted(set(finished_shards(folder)) - before)
    stats = _count_rows(folder, built)
    seconds = time.perf_counter() - started
    run_stats = {
        "shards_built": len(built),
        "rows_attempted": stats["rows"],
        "successes_written": stats["successes"],
        "seconds": round(seconds, 3),
        "rows_per_s": round(stats["rows"] / seconds, 2) if seconds > 0 else 0.0,
        "samples_per_s": round(stats["successes"] / seconds, 2) if seconds > 0 else 0.0,
    }
    summary = summarize(folder, state, run_stats)
    atomic_write_json(Path(config.root) / SUMMARY_FILENAME, summary)
    print(format_summary(summary), flush=True)
    return summary


def _with_question_columns(extra_columns: list[str], question_columns) -> list[str]:
    """The configured extra columns, then the URL list's question-answer columns (issue 18), each once:
    img2dataset copies them into every sample's json, where processing reads the question."""
    return list(dict.fromkeys([*extra_columns, *question_columns]))


def _count_rows(folder: Path, shards: list[int]) -> dict:
    import pyarrow.parquet as pq

    rows = successes = 0
    for shard in shards:
        table = pq.read_table(folder / f"{shard:05d}.parquet", columns=["status"])
        rows += table.num_rows
        successes += sum(1 for s in table.column("status").to_pylist() if s == "success")
    return {"rows": rows, "successes": successes}


def _retry_failed_rows(config: Config, folder: Path, state: dict) -> None:
    import pandas as pd

    rows = read_row_states(folder, state)
    failed = rows[rows["reason"] != "success"]
    if failed.empty:
        print("retry-failed: no failed rows to retry", flush=True)
        return
    extras = [c for c in _with_question_columns(config.download.extra_columns, QA_FIELDS) if c in failed.columns]
    retry_list = pd.DataFrame(
        {"url": failed["url"].values, "caption": failed["caption"].values, SOURCE_KEY_COLUMN: failed["key"].values}
    )
    for column in extras:
        retry_list[column] = failed[column].values
    state["retry_rounds"] += 1
    retry_path = Path(config.root) / "retry" / f"round_{state['retry_rounds']:03d}.parquet"
    atomic_write_bytes(retry_path, retry_list.to_parquet(index=False))
    atomic_write_json(Path(config.root) / STATE_FILENAME, state)
    print(f"retry-failed: fetching {len(retry_list)} failed rows again ({retry_path})", flush=True)
    _run_img2dataset(
        retry_path, "parquet", folder, config,
        url_col="url", caption_col="caption", extra_columns=[*extras, SOURCE_KEY_COLUMN], incremental_mode="extend",
    )
