"""Checkpoint retention worker for tests/test_checkpoint_retention.py: one CPU rank (gloo), a real
DeepSpeed engine over a small linear model, and the training loop's own `save_checkpoint` and
`load_latest_checkpoint` with `keep_checkpoints=1`, in the case of finding T9:

1. a checkpoint at step 200 is written, then damaged (one of its files cut);
2. the resume finds no usable checkpoint, so the run starts again and saves step 50;
3. retention keeps 1 tag: it must keep step 50 (just written, named by `latest`), not the damaged 200.

Run as `python tests/checkpoint_retention_worker.py <checkpoint dir>` with MASTER_PORT set; prints
one JSON line: the tags left, `latest`, and the step a further resume continues from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(checkpoint_dir: Path) -> None:
    import deepspeed
    import torch

    from vlpdist.train.checkpoint import LATEST, list_checkpoints, load_latest_checkpoint, save_checkpoint
    from vlpdist.train.state import TrainState

    from vlpdist.parallel.engine import init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    init_distributed(120)  # not deepspeed.init_distributed: ours skips the CPU shm op's minute-long JIT build
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    device = torch.device("cpu")
    keep = 1

    def resume_state(manifest: dict) -> TrainState:
        return TrainState.from_dict(manifest["train_state"])

    save_checkpoint(engine, checkpoint_dir, TrainState(step=200), keep, False, {"plan": "demo"}, device)
    damaged = max((path for path in (checkpoint_dir / "step_00000200").rglob("*.pt")), key=lambda path: path.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[:-8])
    resumed = load_latest_checkpoint(engine, checkpoint_dir, False, device, resume_state)
    assert resumed is None, resumed  # the damaged tag is skipped and there is no other
    save_checkpoint(engine, checkpoint_dir, TrainState(step=50), keep, False, {"plan": "demo"}, device)
    again = load_latest_checkpoint(engine, checkpoint_dir, False, device, resume_state)
    print(json.dumps({"tags": list_checkpoints(checkpoint_dir), "latest": (checkpoint_dir / LATEST).read_text().strip(),
                      "resumed_step": again.step if again is not None else None}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
