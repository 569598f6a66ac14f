"""The run report: `python -m launcher.report <root or run folder> [--out <file>.html]`.

One self-contained static HTML page (inline thumbnails and SVG plots, no script, no network; opens
from a file): ingestion, the caption filter's decisions, object labels, training curves, held-out
captions, retrieval, the memory bank and geodesics, the ablation table (`vlpdist.report.page`).
A section whose files are missing or damaged says so on the page. Default --out: `<path>/report.html`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlpdist.errors import UserError, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="launcher.report", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a data root (the demo's root=) or a training run folder")
    parser.add_argument("--out", default=None, help="the HTML file (default: <path>/report.html)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder (give a data root or a training run folder)")
    from vlpdist.report.page import build_report, write_report

    out = write_report(build_report(path), Path(args.out) if args.out else path / "report.html")
    print(f"report written to {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
