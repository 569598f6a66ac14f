"""Ingestion entry point: `python -m data_ingest.run --config configs/<x>.yaml [key=value ...]`.

Also the target of `ray submit configs/ray/<cluster>.yaml data_ingest/run.py -- --config ...`
(run as a plain script there) and of `ray job submit -- python -m data_ingest.run ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`ray submit` copies it): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlpdist.config import load_config, save_config  # noqa: E402
from vlpdist.errors import UserError, exit_on_user_error  # noqa: E402

STAGES = ("download", "process")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_ingest.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--stage", default="all", choices=("all", *STAGES),
                        help="download (img2dataset), process (Ray: CLIP, CapFilt, labels) or all in order")
    parser.add_argument("--retry-failed", action="store_true", help="fetch again only the rows that failed")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    save_config(config, config.root)
    results = {}
    if args.stage in ("all", "download"):
        from data_ingest.download import run_download

        results["download"] = run_download(config, retry_failed=args.retry_failed)
    if args.stage in ("all", "process") and config.process.enabled:
        from data_ingest.process import run_process

        results["process"] = run_process(config)
        failed_shards = results["process"].get("shards_failed") or {}
        if failed_shards:
            # Finished shards are kept; a rerun processes only these.
            print(f"error: {len(failed_shards)} shard(s) failed after all retries: {', '.join(sorted(failed_shards))}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except UserError:  # already reported by exit_on_user_error
        raise
