"""Stop signals during a run: SIGUSR2 (Slurm's `--signal`) and SIGTERM are remembered during the
training steps (the step loop checks at step boundaries and checkpoints), and stop the process at
once after them (export, evaluation)."""

from __future__ import annotations

import signal

PREEMPTED_EXIT_CODE = 3
"""Exit code of a run stopped by SIGUSR2/SIGTERM after writing its checkpoint (requeue me)."""

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StoppedBySignal(BaseException):
    """A stop signal during the export or evaluation after training: nothing is left to checkpoint,
    so the process stops there (a BaseException, like KeyboardInterrupt, so that no `except
    Exception` swallows it and every `finally` still removes its staging)."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal
        super().__init__(self.signal_name)


class PreemptionSignal:
    """Remembers SIGUSR2 (Slurm's `--signal`) and SIGTERM during training; the loop checks at step
    boundaries. Once training is over (`training_over`), the same signals stop the process at once."""

    def __init__(self):
        self.received: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name  # the first one says why

    def tolerate_stopped_loader_workers(self) -> None:
        """Call after the loader's workers started. Slurm signals every process of a job step, the
        loader workers too, and they die of it (they keep the default SIGTERM); torch's SIGCHLD
        handler would then raise in the middle of the step that is about to be checkpointed. Once
        a stop signal has come, a worker's death is left to the loader's own check, which raises
        only if the loop still asks it for a batch."""
        torch_handler = signal.getsignal(signal.SIGCHLD)
        if not callable(torch_handler):
            return

        def on_child_exit(signum, frame) -> None:
            if self.received is None:
                torch_handler(signum, frame)

        signal.signal(signal.SIGCHLD, on_child_exit)

    def training_over(self) -> None:
        """From here on (export, evaluation) a stop signal raises `StoppedBySignal`; one that came
        after the last step's check does so now."""
        if self.received is not None:
            raise StoppedBySignal(signal.Signals[self.received])
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stopped)


def _raise_stopped(signum, frame) -> None:
    raise StoppedBySignal(signum)


class StopTolerantLoader:
    """The step loop's batch iterator, started by `start_loader()` at the run state's data position.
    Slurm's scancel sends SIGTERM to every process of the step, loader workers included, and they
    die of it: if the loop still needs a batch of the step it is finishing (to checkpoint it, on every
    rank alike), the dead worker's loader raises. Once a stop signal has come, such a failure starts
    the loader again at the position of the batch asked for (new workers, after the signal), so the
    step completes; without a stop signal a failure is raised as it is."""

    def __init__(self, start_loader, preemption: PreemptionSignal):
        self._start_loader = start_loader  # () -> an iterator over batches from the state's data_position
        self._preemption = preemption
        self._loader = start_loader()

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._loader)
        except StopIteration:  # the stream's end is not a failure (the step loader is endless)
            raise
        except Exception as err:  # "worker exited unexpectedly", or the batch's shared memory gone with it (OSError)
            if self._preemption.received is None:
                raise
            first_line = (str(err).splitlines() or [""])[0]
            print(f"after {self._preemption.received} the loader failed ({type(err).__name__}: {first_line}): "
                  "started again at its position to finish the step", flush=True)
            self._loader = self._start_loader()
            return next(self._loader)
