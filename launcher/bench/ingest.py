"""Ingestion throughput, side by side: `python -m launcher.bench.ingest [--num-samples 2000] [--quick]`.

The demo's images served on the loopback HTTP server (no broken URLs, so every row is a success),
fetched by the download stage (img2dataset: fetch, decode, resize, encode, write webdataset shards)
and, as the ceiling on this machine, by a bare threaded fetch of the same URLs that only reads the
bytes. Both use the same process and thread counts. Rows per CPU-second (user + system time of this
process and its reaped children: img2dataset's download processes) is the per-core rate; it
resists other load on a shared machine, which skews wall-clock rates. Runs alternate between the
two and the best of `--repeats` counts. `run_benchmark(...)` returns a JSON-ready dict.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def cpu_seconds() -> float:
    """User + system seconds of this process and its reaped children so far."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def bare_fetch(urls: list[str], threads: int) -> int:
    """GET every URL on `threads` threads, reading the body and nothing else; returns the bytes read."""
    def fetch(url: str) -> int:
        with urllib.request.urlopen(url, timeout=30) as response:
            return len(response.read())

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(fetch, urls))


def run_benchmark(num_samples: int = 2000, samples_per_shard: int = 500, processes: int = 1, threads: int = 16,
                  repeats: int = 2, work: Path | None = None) -> dict:
    """{rows, img2dataset: {...}, bare_fetch: {...}, ratio_per_cpu_s, ratio_wall}; see the module docstring."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="vlpdist-bench-ingest-") as folder:
            return run_benchmark(num_samples, samples_per_shard, processes, threads, repeats, Path(folder))
    import contextlib
    import io

    import pandas as pd

    from data_ingest.download import run_download
    from data_ingest.sources.demo_server import DemoImageServer
    from data_ingest.sources.synthetic import generate_demo_samples
    from launcher.demo import write_demo_url_list
    from vlpdist.config import load_config

    overrides = [f"demo.num_samples={num_samples}", "demo.broken_per_kind=0", f"download.samples_per_shard={samples_per_shard}",
                 f"download.processes={processes}", f"download.threads={threads}"]
    config = load_config(None, [f"root={work / 'source_root'}", *overrides])
    samples = generate_demo_samples(config.demo)
    measured: dict[str, list[dict]] = {"img2dataset": [], "bare_fetch": []}
    with DemoImageServer({s.path: s.jpeg for s in samples}, {}, config.demo.slow_response_s) as server:
        url_list = write_demo_url_list(config, server.base_url, samples)
        urls = list(pd.read_parquet(url_list)["url"])
        for repeat in range(repeats):
            root = work / f"run{repeat}"
            run_config = load_config(None, [f"root={root}", *overrides, f"download.url_list={url_list}"])
            cpu_before, started = cpu_seconds(), time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                summary = run_download(run_config)
            measured["img2dataset"].append({"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu_before,
                                            "rows": summary["input_rows"], "success": summary["success"]})
            shutil.rmtree(root, ignore_errors=True)
            cpu_before, started = cpu_seconds(), time.perf_counter()
            with ThreadPoolExecutor(processes) as pool:  # one fetcher per "process", as img2dataset splits the list
                list(pool.map(lambda part: bare_fetch(part, threads), [urls[i::processes] for i in range(processes)]))
            measured["bare_fetch"].append({"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu_before,
                                           "rows": len(urls), "success": len(urls)})
    result = {"rows": len(urls), "processes": processes, "threads": threads, "repeats": repeats}
    for name, runs in measured.items():
        result[name] = {
            "rows_per_s": max(run["rows"] / run["seconds"] for run in runs),
            "rows_per_cpu_s": max(run["rows"] / max(run["cpu_seconds"], 1e-9) for run in runs),
            "success": runs[-1]["success"],
        }
    result["rows_per_s_per_process"] = result["img2dataset"]["rows_per_s"] / processes
    result["ratio_per_cpu_s"] = result["img2dataset"]["rows_per_cpu_s"] / result["bare_fetch"]["rows_per_cpu_s"]
    result["ratio_wall"] = result["img2dataset"]["rows_per_s"] / result["bare_fetch"]["rows_per_s"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="200 samples, one repeat")
    args = parser.parse_args(argv)
    settings = dict(num_samples=args.num_samples, samples_per_shard=args.samples_per_shard, processes=args.processes,
                    threads=args.threads, repeats=args.repeats)
    if args.quick:
        settings |= {"num_samples": 200, "samples_per_shard": 100, "repeats": 1}
    result = run_benchmark(**settings)
    for name in ("img2dataset", "bare_fetch"):
        print(f"{name:12} {result[name]['rows_per_s']:9.1f} rows/s {result[name]['rows_per_cpu_s']:9.1f} rows/CPU-s")
    print(f"img2dataset / bare fetch: {result['ratio_per_cpu_s']:.2f} per CPU-second, {result['ratio_wall']:.2f} wall")
    return result


if __name__ == "__main__":
    main()
