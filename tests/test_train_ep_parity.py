"""Expert-parallel training is checked for what it computes: on the same global batch and from the
same initial weights, ep_size 2 gives the gradients and the weights of ep_size 1 after two
optimizer steps (fp32, ZeRO 1 and 2, within 1e-5 relative), at 2 ranks (experts split over both)
and at 4 ranks (expert-parallel groups of 2 and expert-data-parallel groups of 2, the layout of
every real cluster). The run itself is `tests/ep_parity_worker.py` under `deepspeed --num_gpus N`.

A negative control shows the comparison can fail: expert gradients multiplied by ep_size (what an
expert gradient averaged over the expert-data-parallel group, W/ep ranks, instead of all W ranks
would give) are caught in the gradients and in the weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from common_fixtures import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORKER = REPO / "tests" / "ep_parity_worker.py"
RTOL = 1e-5
ATOL = 1e-12  # only for tensors that are exactly zero at ep_size 1 (the gradient of an expert no sample chose)
LR = 0.01
STAGES = (1, 2)
LAUNCH_TIMEOUT_S = 400  # a 4-rank start is ~30 s on an idle laptop, minutes on 2 busy cores


def run_worker(lm_dir: Path, out: Path, num_procs: int, ep_sizes: tuple[int, ...], *extra: str) -> Path:
    """One `deepspeed` launch of the worker: every (ep size, ZeRO stage) variant in the same process group."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [
        str(deepspeed), "--num_gpus", str(num_procs), "--master_port", str(free_port()), str(WORKER),
        "--lm", str(lm_dir), "--out", str(out), "--ep-sizes", ",".join(map(str, ep_sizes)),
        "--zero-stages", ",".join(map(str, STAGES)), "--lr", str(LR), *extra,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"{num_procs}-rank launch failed (exit {result.returncode}):\n"
                           + result.stdout[-3000:] + result.stderr[-3000:])
    return out


def load_run(out: Path, variant: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(out / f"{variant}.safetensors")), json.loads((out / f"{variant}.json").read_text())


def relative_errors(run: dict, reference: dict, kind: str) -> dict[str, float]:
    """Per tensor `||run - ref|| / ||ref||` over the keys `kind/...` (both sides must name the same tensors)."""
    names = sorted(key for key in reference if key.startswith(f"{kind}/"))
    assert names and names == sorted(key for key in run if key.startswith(f"{kind}/"))
    errors = {}
    for name in names:
        diff = float((run[name] - reference[name]).norm())
        scale = float(reference[name].norm())
        errors[name] = diff / scale if scale > 0 else (0.0 if diff <= ATOL else float("inf"))
    return errors


def worst(errors: dict[str, float]) -> tuple[float, str]:
    name = max(errors, key=errors.get)
    return errors[name], name


@pytest.fixture(scope="module")
def reference(tiny_lm, tmp_path_factory) -> Path:
    """One rank, ep_size 1: every expert on the one rank, the whole global batch in one micro-batch."""
    return run_worker(tiny_lm, tmp_path_factory.mktemp("ep_parity_w1"), 1, (1,))


# Per world size, the ep sizes one launch runs; the 2-rank launch adds the negative control at ep 2.
LAUNCHES = {2: ((2, 1), ("--wrong-expert-grad-scale", "2")), 4: ((2,), ())}


@pytest.fixture(scope="module")
def launches(tiny_lm, tmp_path_factory):
    """num_procs -> the launch's output folder; launched once on first use (a failure is not retried)."""
    done: dict[int, Path | str] = {}

    def get(num_procs: int) -> Path:
        if num_procs not in done:
            ep_sizes, extra = LAUNCHES[num_procs]
            try:
                done[num_procs] = run_worker(tiny_lm, tmp_path_factory.mktemp(f"ep_parity_w{num_procs}"), num_procs, ep_sizes, *extra)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                done[num_procs] = str(err)
        if isinstance(done[num_procs], str):
            pytest.fail(done[num_procs], pytrace=False)
        return done[num_procs]

    return get


@pytest.mark.parametrize("stage", STAGES)
def test_two_steps_change_every_weight(reference, stage):
    """The comparison means something: every trainable tensor moves far more than the tolerance."""
    state, summary = load_run(reference, f"ep1_zero{stage}")
    assert summary["world_size"] == 1 and summary["ep_size"] == 1 and len(summary["losses"]) == 2
    names = [key.split("/", 1)[1] for key in state if key.startswith("init/")]
    assert any(".deepspeed_experts." in name for name in names) and any(".gate.wg." in name for name in names)
    for name in names:
        moved = float((state[f"final/{name}"] - state[f"init/{name}"]).norm())
        assert moved > 1e3 * RTOL * max(float(state[f"final/{name}"].norm()), 1e-3), name
        assert float(state[f"grad1/{name}"].norm()) > 0 or float(state[f"grad2/{name}"].norm()) > 0, name


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("num_procs", "ep_size"), [(2, 2), (2, 1), (4, 2)], ids=["w2-ep2", "w2-ep1", "w4-ep2-edp2"])
def test_expert_parallel_matches_one_rank_after_two_steps(reference, launches, num_procs, ep_size, stage):
    ref, ref_summary = load_run(reference, f"ep1_zero{stage}")
    run, summary = load_run(launches(num_procs), f"ep{ep_size}_zero{stage}")
    assert (summary["world_size"], summary["ep_size"], summary["zero_stage"]) == (num_procs, ep_size, stage)
    # The same starting point: the ep_size-1 weights, loaded into each rank's share of the experts.
    assert worst(relative_errors(run, ref, "init"))[0] == 0.0
    for kind in ("grad1", "grad2", "final"):
        error, name = worst(relative_errors(run, ref, kind))
        assert error <= RTOL, f"{kind}: {name} differs by {error:.3g} relative (world {num_procs}, ep {ep_size}, ZeRO {stage})"
    assert summary["losses"] == pytest.approx(ref_summary["losses"], rel=RTOL)


def test_wrongly_scaled_expert_gradients_are_caught(reference, launches):
    """Negative control (2 ranks, ep 2, ZeRO 2): expert gradients x ep_size fail both comparisons."""
    ref, _ = load_run(reference, "ep1_zero2")
    run, summary = load_run(launches(2), "ep2_zero2_wrong_expert_grads")
    assert summary["wrong_expert_grad_scale"] == 2.0
    grads = relative_errors(run, ref, "grad1")
    expert_grads = [error for name, error in grads.items() if ".deepspeed_experts." in name and error > 0]
    assert expert_grads and min(expert_grads) == pytest.approx(1.0, rel=1e-4)  # |2g - g| / |g|
    assert max(error for name, error in grads.items() if ".deepspeed_experts." not in name) <= RTOL
    error, name = worst(relative_errors(run, ref, "final"))
    assert error > 100 * RTOL, f"a wrong expert-gradient scale moved the weights only by {error:.3g} ({name})"
