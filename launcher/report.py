"""The run report: `python -m launcher.report <root or run folder> [--out <file>.html] [--screenshot <file>.png [--screenshot-height PX]]`.

One self-contained static HTML page (inline thumbnails and SVG plots, no script, no network; opens
from a file): ingestion, the caption filter's decisions, object labels, training curves, held-out
captions, retrieval, the memory bank and geodesics, the ablation table (`vlpdist.report.page`).
A section whose files are missing or damaged says so on the page. Default --out: `<path>/report.html`;
a file there that is not a report vlpdist wrote is refused, never overwritten. `--screenshot` opens
the page in headless Chromium (Debian's chromium + chromium-driver, through selenium) and writes a
PNG, 1200 px wide, of the whole page or of its top `--screenshot-height` pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlpdist.errors import UserError, exit_on_user_error

DEFAULT_PAGE_NAME = "report.html"


def write_run_report(path: Path, out: Path | None = None, option: str = "--out") -> Path:
    """Build the page of the root or run folder `path` and write it to `out` (default `<path>/report.html`);
    `launcher.demo` calls this at the end of its run."""
    from vlpdist.report.page import build_report, refuse_foreign_report, write_report

    out = Path(out) if out is not None else Path(path) / DEFAULT_PAGE_NAME
    refuse_foreign_report(out, option)  # before the page is built: a refusal costs nothing
    return write_report(build_report(Path(path)), out, option)


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="launcher.report", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a data root (the demo's root=) or a training run folder")
    parser.add_argument("--out", default=None, help=f"the HTML file (default: <path>/{DEFAULT_PAGE_NAME})")
    parser.add_argument("--screenshot", default=None, help="also render the page in headless Chromium into this PNG")
    parser.add_argument("--screenshot-height", type=int, default=None,
                        help="the PNG holds the page's top this many pixels (default: the whole page)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder (give a data root or a training run folder)")
    if args.screenshot_height is not None and (args.screenshot is None or args.screenshot_height < 1):
        raise UserError("--screenshot-height needs --screenshot and at least 1 pixel")
    if args.screenshot is not None:
        from vlpdist.report.browser import require_chromium

        if Path(args.screenshot).is_dir():
            raise UserError(f"--screenshot {args.screenshot} is a folder: give the PNG file's name")
        require_chromium()  # before the page is built: a machine without a browser learns it at once
    out = write_run_report(path, Path(args.out) if args.out else None)
    print(f"report written to {out}", flush=True)
    if args.screenshot is not None:
        from vlpdist.report.browser import save_screenshot

        png = save_screenshot(out, Path(args.screenshot), args.screenshot_height)
        print(f"screenshot written to {png}", flush=True)
    return out


if __name__ == "__main__":
    main()
