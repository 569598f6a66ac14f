"""TensorBoard logging from rank 0 only: `tensorboard --logdir <run>/tb --host 127.0.0.1`.

Tags written by training: `loss/<term>` for each loss term, `opt/lr`, `opt/grad_norm`,
`throughput/samples_per_s`, `throughput/tokens_per_s`, `moe/expert_load/<e>` (fraction of
samples routed to expert e), `data/nan_skipped` (optimizer steps skipped), `data/epoch`,
`data/left_out_per_epoch` (samples the plan leaves out of each epoch), and `captions/sample` (text).
"""

from __future__ import annotations

from pathlib import Path


class TensorBoardLogger:
    """A `SummaryWriter` on rank 0; every method is a no-op on other ranks."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None):
        """`purge_step`: on resume, the first step not in the checkpoint; events logged at or after
        it by the run that was cut off are hidden, so curves do not double back."""
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def expert_load(self, load_E: list[float], step: int) -> None:
        self.scalars({f"moe/expert_load/{expert}": fraction for expert, fraction in enumerate(load_E)}, step)

    def captions(self, tag: str, pairs: list[tuple[str, str]], step: int) -> None:
        """A markdown table of (reference, generated) caption pairs."""
        if self.writer is None:
            return
        rows = "\n".join(f"| {reference} | {generated} |" for reference, generated in pairs)
        self.writer.add_text(tag, f"| reference | generated |\n|---|---|\n{rows}", step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
