"""The embedded demo, end to end: `python -m launcher.demo [--config configs/demo.yaml] [key=value ...]`.

It makes its own world (no hub, no internet): generates the synthetic image-caption pairs,
serves them with every kind of broken URL on a loopback HTTP server, writes the URL list, and
runs the real ingestion on it (img2dataset into webdataset shards), printing each stage's summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vlpdist.config import Config, load_config, save_config
from vlpdist.errors import exit_on_user_error

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def write_demo_url_list(config: Config, base_url: str, samples) -> Path:
    """Write `<root>/source/urls.parquet` (what ingestion reads) and the ground truth beside it."""
    import pandas as pd

    from data_ingest.sources.synthetic import demo_url_rows
    from vlpdist.atomic import atomic_write_bytes

    rows = pd.DataFrame(demo_url_rows(samples, config.demo, base_url))
    source = Path(config.root) / "source"
    source.mkdir(parents=True, exist_ok=True)
    url_list = source / "urls.parquet"
    atomic_write_bytes(url_list, rows[["url", "caption"]].to_parquet(index=False))
    truth = rows.assign(url_path=rows["url"].str.replace(base_url + "/", "", regex=False)).drop(columns=["url"])
    atomic_write_bytes(source / "demo_truth.parquet", truth.to_parquet(index=False))
    return url_list


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)

    from data_ingest.download import run_download
    from data_ingest.sources.demo_server import DemoImageServer
    from data_ingest.sources.synthetic import broken_paths, generate_demo_samples

    started = time.perf_counter()
    samples = generate_demo_samples(config.demo)
    print(f"demo: generated {len(samples)} images ({sum(s.is_mismatched for s in samples)} with mismatched captions)")
    with DemoImageServer({s.path: s.jpeg for s in samples}, broken_paths(config.demo), config.demo.slow_response_s) as server:
        print(f"demo: serving them on {server.base_url} with {len(broken_paths(config.demo))} broken URLs")
        config.download.url_list = str(write_demo_url_list(config, server.base_url, samples))
        save_config(config, config.root)
        results = {"download": run_download(config)}
    print(f"demo: done in {time.perf_counter() - started:.0f} s; outputs under {config.root}")
    return results


if __name__ == "__main__":
    main()
