"""Launch a training script on this machine's ranks with DeepSpeed's launcher.

`deepspeed --num_gpus N` starts N processes (GPUs, or CPU processes on gloo when there is no GPU)
and kills the others when one exits with an error, so a dead rank ends the whole launch.
The script is the caller's (`launcher.paths.TRAIN_SCRIPT`): the library knows no entry point.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def deepspeed_train_command(train_script: str | Path, config_path: str | Path, overrides: list[str], num_procs: int,
                            master_port: int = 29500, extra_args: list[str] = ()) -> list[str]:
    """The `deepspeed --num_gpus N <train_script> --config ... key=value ...` command line."""
    # The deepspeed launcher beside this interpreter, so the ranks run in the same environment.
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [
        str(deepspeed), "--num_gpus", str(num_procs), "--master_port", str(master_port),
        str(train_script), "--config", str(config_path), *extra_args, *overrides,
    ]


def run_deepspeed(train_script: str | Path, config_path: str | Path, overrides: list[str] = (), num_procs: int = 2,
                  master_port: int = 29500, cwd: str | Path | None = None) -> int:
    """Run `train_script` on `num_procs` local ranks (in `cwd`, default this process's) and return the launcher's exit code."""
    command = deepspeed_train_command(train_script, config_path, list(overrides), num_procs, master_port)
    return subprocess.run(command, cwd=cwd).returncode
