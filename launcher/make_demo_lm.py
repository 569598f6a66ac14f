"""Build the demo's small language model: `python -m launcher.make_demo_lm --out runs/demo/lm [--config configs/demo.yaml]`.

The builder itself is `data_ingest.sources.demo_lm.make_demo_lm`, beside the demo's other world builders.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data_ingest.sources.demo_lm import WRITER, make_demo_lm
from data_ingest.sources.synthetic import generate_demo_samples
from launcher.paths import DEFAULT_CONFIG
from vlpdist.atomic import refuse_foreign_output
from vlpdist.config import load_config
from vlpdist.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="launcher.make_demo_lm", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the LM and tokenizer into: new, empty, or an earlier "
                                                     "launcher.make_demo_lm output (replaced atomically); any other is refused")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="its demo section says which captions")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps on the captions")
    args = parser.parse_args(argv)
    refuse_foreign_output(args.out, WRITER, "--out")  # before the captions are generated
    config = load_config(args.config)
    captions = [sample.caption for sample in generate_demo_samples(config.demo)]
    started = time.perf_counter()
    out_dir = make_demo_lm(args.out, captions, steps=args.steps)
    print(f"demo LM ({len(captions)} captions, {args.steps} steps) written to {out_dir} in {time.perf_counter() - started:.1f} s")
    return out_dir


if __name__ == "__main__":
    main()
