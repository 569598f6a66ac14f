"""Nothing waits without end, nothing swallows a stop: rendezvous ports outside the ephemeral range
and a taken one reported in one line; loader workers end on SIGTERM; a signal after the training
steps stops the export/evaluation instead of being swallowed (and is no planned stop)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from common_fixtures import REPO, wait_for
from train_fixtures import TINY_CONFIG

from vlpdist.data.feature_shards import build_shard_plan, build_train_loader, list_feature_shards
from vlpdist.data.synthetic import write_synthetic_feature_shards
from vlpdist.parallel.launch import ephemeral_port_range, free_server_ports
from vlpdist.train.preemption import PreemptionSignal, StopTolerantLoader, StoppedBySignal

TRAIN_SCRIPT = REPO / "launcher" / "train.py"


@pytest.fixture
def own_signal_handlers():
    """Put back this process's handlers of the signals a PreemptionSignal takes over."""
    taken = (signal.SIGTERM, signal.SIGUSR2, signal.SIGCHLD)
    saved = {signum: signal.getsignal(signum) for signum in taken}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_picked_ports_lie_outside_the_ephemeral_range():
    low, high = ephemeral_port_range()
    ports = free_server_ports(8)
    assert len(set(ports)) == 8
    assert all(not low <= port <= high for port in ports), (ports, low, high)


def _run_train_alone(tmp_path: Path, master_port: int | None) -> subprocess.CompletedProcess:
    """launcher/train.py as one process on its own (no launcher), over a feature folder that does
    not exist: past the rendezvous it stops with that folder's one-line error."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if master_port is not None:
        env["MASTER_PORT"] = str(master_port)
    overrides = ["train.ep_size=1", f"train.features_dir={tmp_path / 'no_features'}", f"train.output_dir={tmp_path / 'run'}"]
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(TINY_CONFIG), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_taken_rendezvous_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", free_server_ports(1)[0]))
        holder.listen()
        port = holder.getsockname()[1]
        done = _run_train_alone(tmp_path, port)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the rendezvous port {port} (MASTER_PORT) is taken on this machine, by another run or service: "
        "set MASTER_PORT (or the launcher's --master_port) to a free port")


def test_single_process_run_does_not_need_port_29500(tmp_path):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 29500))  # taken by this test, unless something else holds it already
        holder.listen()
    except OSError:
        pass
    try:
        done = _run_train_alone(tmp_path, None)
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no_features" in last and "port" not in last


def _caught_signals(pid: int) -> int:
    """The SigCgt mask of /proc/<pid>/status: bit n-1 set when signal n has a handler."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return int(line.split()[1], 16)


def test_loader_workers_end_on_sigterm_even_in_a_stopping_trainer(tmp_path, own_signal_handlers):
    write_synthetic_feature_shards(tmp_path, num_shards=2, samples_per_shard=16, dim=8, seed=0)
    plan = build_shard_plan(list_feature_shards(tmp_path), world_size=1, num_workers=1, micro_batch_size=4, seed=0)
    preemption = PreemptionSignal()  # as the trainer does before it starts the loader
    loader = iter(build_train_loader(plan, 0, 0))
    preemption.tolerate_stopped_loader_workers()
    next(loader)  # the worker has run its init
    (worker,) = loader._workers
    assert not _caught_signals(worker.pid) & (1 << (signal.SIGTERM - 1)), "the worker handles SIGTERM"
    # Slurm signals every process of the step: the trainer notes the stop, the worker ends, and
    # the trainer is not interrupted for it (it still checkpoints).
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(60)
    assert worker.exitcode == -signal.SIGTERM
    wait_for(lambda: preemption.received == "SIGTERM", 10, "the trainer's handler")
    del loader


def test_a_loader_whose_worker_died_of_the_stop_signal_starts_again_at_its_position(tmp_path, own_signal_handlers, capsys):
    """scancel signals the loader workers too: the step being finished (and checkpointed) still gets its
    batches, the same ones in the same order (seen in CI: a worker dead of scancel's SIGTERM failed the
    step, exit 1, no checkpoint). Without a stop signal a dead worker is still an error."""
    import itertools

    write_synthetic_feature_shards(tmp_path, num_shards=2, samples_per_shard=16, dim=8, seed=0)
    plan = build_shard_plan(list_feature_shards(tmp_path), world_size=1, num_workers=1, micro_batch_size=4, seed=0)
    straight = [batch["keys"] for batch in itertools.islice(iter(build_train_loader(plan, 0, 0)), 8)]
    preemption = PreemptionSignal()
    consumed: list[dict] = []
    loader = StopTolerantLoader(lambda: iter(build_train_loader(plan, 0, len(consumed))), preemption)
    preemption.tolerate_stopped_loader_workers()
    consumed.append(next(loader))
    (worker,) = loader._loader._workers
    os.kill(os.getpid(), signal.SIGTERM)
    wait_for(lambda: preemption.received == "SIGTERM", 10, "the trainer's handler")
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(60)
    while len(consumed) < 8:  # the dead worker's prefetched batches first, then a new loader's
        consumed.append(next(loader))
    assert [batch["position"] for batch in consumed] == list(range(8))
    assert [batch["keys"] for batch in consumed] == straight
    assert "after SIGTERM the loader failed" in capsys.readouterr().out

    quiet = PreemptionSignal()
    loader = StopTolerantLoader(lambda: iter(build_train_loader(plan, 0, 0)), quiet)
    next(loader)
    (worker,) = loader._loader._workers
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(60)
        for _ in range(8):
            next(loader)


def test_signal_after_the_training_steps_stops_with_its_exit_code(own_signal_handlers):
    preemption = PreemptionSignal()
    preemption.training_over()
    with pytest.raises(StoppedBySignal) as stopped:
        os.kill(os.getpid(), signal.SIGUSR2)
        wait_for(lambda: False, 30, "the signal to stop this")
    assert stopped.value.signal_name == "SIGUSR2" and stopped.value.exit_code == 128 + signal.SIGUSR2

    late = PreemptionSignal()  # a signal that came after the last step's check, before the export
    os.kill(os.getpid(), signal.SIGTERM)
    wait_for(lambda: late.received == "SIGTERM", 10, "the trainer's handler")
    with pytest.raises(StoppedBySignal) as stopped:
        late.training_over()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
