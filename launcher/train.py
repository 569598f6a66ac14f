"""Train the mapper with DeepSpeed: `deepspeed launcher/train.py --config configs/<x>.yaml [key=value ...]`.

Also runs under `srun` (slurm/pretrain.sh) or `torchrun`: the rank comes from RANK/LOCAL_RANK/
WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Without them it is one process on its own.
Config and overrides may also come from the environment (VLPDIST_CONFIG, VLPDIST_OVERRIDES, as
space-separated key=value) so one sbatch script serves every recipe.

`--evaluate-export <dir>` skips training: it reloads a consolidated fp32 export at this launch's
world size and `train.ep_size` and evaluates it on the held-out shards (into train.output_dir).

Exit codes: 0 done; 1 failure (e.g. too many NaN steps in a row); 2 user error (one line);
3 stopped by SIGUSR2/SIGTERM after writing a checkpoint (requeue to resume) -- unless
VLPDIST_STOP_MARKER names a file: then rank 0 writes the step and signal there and every rank exits 0
(slurm/pretrain.sh reads it); 128 + the signal's number: stopped by SIGUSR2/SIGTERM after the
training steps, during the export or evaluation (the last checkpoint holds every step: rerun to
export and evaluate).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# `deepspeed launcher/train.py` runs this file as a script: make the project importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlpdist.config import load_config  # noqa: E402
from vlpdist.errors import exit_on_user_error  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launcher/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get("VLPDIST_CONFIG"), help="YAML recipe (default: $VLPDIST_CONFIG)")
    parser.add_argument("--evaluate-export", type=Path, default=None, help="evaluate this export folder instead of training")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher (LOCAL_RANK is used)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from vlpdist.parallel.engine import leave_process_group
    from vlpdist.train.loop import run_export_evaluation, run_training
    from vlpdist.train.preemption import StoppedBySignal
    from vlpdist.train.steps import TrainingDiverged

    args = parse_args(argv)
    overrides = shlex.split(os.environ.get("VLPDIST_OVERRIDES", "")) + list(args.overrides)
    config = load_config(args.config, overrides)
    try:
        if args.evaluate_export is not None:
            return run_export_evaluation(config, args.evaluate_export)
        stop_marker = os.environ.get("VLPDIST_STOP_MARKER")
        return run_training(config, Path(stop_marker) if stop_marker else None)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except StoppedBySignal as stop:
        print(f"stopped by {stop.signal_name} after the training steps (export/evaluation not finished; the last "
              f"checkpoint holds every step: rerun to finish them), exit {stop.exit_code}", file=sys.stderr, flush=True)
        return stop.exit_code
    finally:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
