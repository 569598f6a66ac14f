"""The first GPU run, proven on CPU as far as a CPU goes (issue 20):

- `launcher.gpu_wheels` builds a `.whl/` whose install-and-check part of `launcher/gpu_run.sh`
  passes in a fresh venv with `pip --no-index`, the way the bare GPU machine installs it; with one
  wheel deleted the check names the package and exits 2 before any test. The wheels here are a
  pure-Python subset packed from this environment (`--only ... --from-installed`), so the test needs
  no network and is deterministic; the full set is PyPI's, built by the same script (README: GPU).
- `gpu_run.sh --dry-run` end to end: its parts in order, the `$OUT` layout, the bench's per-section
  files, and a previous run's leftovers in its work folders removed (a rerun on a warm machine).
- The DeepSpeed config for a CUDA device asks for torch's fused AdamW, and DeepSpeed builds exactly
  that from it without building any op (FusedAdam is compiled at engine start).
- Caption metrics at the end of training are skipped with the reason where Java is absent; the
  losses stay.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from common_fixtures import REPO, free_port

GPU_RUN = REPO / "launcher" / "gpu_run.sh"
# Pure-Python packages the GPU machine lacks and this environment has: packed offline as wheels.
WHEEL_SUBSET = ("hjson", "braceexpand", "py-cpuinfo")
SUBSET_IMPORTS = {"hjson": "hjson", "braceexpand": "braceexpand", "cpuinfo": "py-cpuinfo"}
PARTS = ["install", "check", "clean", "tests", "bench"]


@pytest.fixture(scope="module")
def subset_wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels") / ".whl"
    result = subprocess.run([sys.executable, "-m", "launcher.gpu_wheels", "--from-installed", "--only", ",".join(WHEEL_SUBSET),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "of the 64 MiB carry limit" in result.stdout
    return out


def gpu_run(out: Path, wheels: Path, work: Path, python: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": python, "VLPDIST_WHEELS": str(wheels), "VLPDIST_GPU_WORK": str(work / "work"),
           "VLPDIST_GPU_SITE": str(work / "site"), "MASTER_PORT": str(free_port())}
    return subprocess.run(["bash", str(GPU_RUN), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)


def parts_run(out: Path) -> list[tuple[str, int]]:
    return [(line.split("\t")[0], int(line.split("\t")[1])) for line in (out / "parts.tsv").read_text().splitlines()]


def test_wheel_script_writes_what_the_gpu_machine_must_import(subset_wheels):
    assert sorted(path.name.split("-")[0] for path in subset_wheels.glob("*.whl")) == ["braceexpand", "hjson", "py_cpuinfo"]
    listed = [line.split() for line in (subset_wheels / "imports.txt").read_text().splitlines() if not line.startswith("#")]
    assert dict(listed) == SUBSET_IMPORTS


def test_wheel_script_refuses_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / ".whl"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a wheel\n")
    result = subprocess.run([sys.executable, "-m", "launcher.gpu_wheels", "--from-installed", "--only", "hjson", "--out", str(foreign)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not an earlier output of launcher.gpu_wheels" in result.stderr
    assert (foreign / "mine.txt").read_text() == "not a wheel\n"


def test_install_and_check_in_a_fresh_offline_venv_names_a_missing_package(subset_wheels, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)  # pip from ensurepip: no network
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import hjson"], capture_output=True).returncode != 0  # nothing there before

    complete = gpu_run(tmp_path / "out", subset_wheels, tmp_path, python, "--check-only")
    assert complete.returncode == 0, complete.stdout + complete.stderr
    assert parts_run(tmp_path / "out") == [("install", 0), ("check", 0)]
    assert f"imported {len(SUBSET_IMPORTS)} of {len(SUBSET_IMPORTS)} packages" in complete.stdout

    lacking = shutil.copytree(subset_wheels, tmp_path / "lacking")
    (wheel,) = lacking.glob("hjson-*.whl")
    wheel.unlink()
    missing = gpu_run(tmp_path / "out_lacking", lacking, tmp_path, python)  # the full run: it must stop before the tests
    assert missing.returncode == 2
    assert "error: missing hjson (hjson): ModuleNotFoundError" in missing.stdout
    assert parts_run(tmp_path / "out_lacking") == [("install", 0), ("check", 2)]
    assert not (tmp_path / "out_lacking" / "tests").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_runs_every_part_in_order_and_writes_each_section(subset_wheels, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # What a previous run on the same (warm) machine left behind.
    for leftover in (work / "work" / "bench" / "stale", out / "bench" / "sections" / "stale.json", out / "tests" / "junit.xml"):
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_text("from the last run\n")
    result = gpu_run(out, subset_wheels, tmp_path / "work", sys.executable, "--dry-run", "--bench-only", "mapper", timeout_s=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert parts_run(out) == [(part, 0) for part in PARTS]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("== ") and line.split()[1] in PARTS] == PARTS
    assert all((out / f"{part}.log").is_file() for part in PARTS)
    assert not (work / "work" / "bench" / "stale").exists() and not (out / "bench" / "sections" / "stale.json").exists()
    # Every gpu-marked test of every file was selected (and skipped here, with the reason).
    junit = (out / "tests" / "junit.xml").read_text()
    assert 'skipped="' in junit and "needs a CUDA device" in junit
    for test_file in ("test_gpu", "test_geodesic", "test_memory_bank"):
        assert f'classname="tests.{test_file}"' in junit, test_file
    # The bench's section files, and its summary printed last.
    assert json.loads((out / "bench" / "sections" / "mapper.json").read_text())["sections"].keys() == {"mapper"}
    assert (out / "bench" / "sections" / "mapper.md").read_text().startswith("| section |")
    assert json.loads((out / "bench" / "bench.json").read_text())["mode"] == "quick"
    assert result.stdout.rstrip().splitlines()[-1].startswith("gpu run: tests exit 0, bench exit 0")


def test_deepspeed_config_for_cuda_builds_torch_fused_adamw_and_no_op(tmp_path):
    """The engine DeepSpeed builds from the CUDA config, on 1 CPU rank (bf16 as on the GPU; comm
    overlap off, which needs CUDA streams): any op DeepSpeed would build is recorded and refused."""
    script = """
import json, sys, torch, deepspeed
from deepspeed.ops.op_builder.builder import OpBuilder
from vlpdist.config import TrainConfig
from vlpdist.parallel.deepspeed_config import build_deepspeed_config
from vlpdist.parallel.engine import init_distributed

def refuse_build(self, *args, **kwargs):
    raise RuntimeError(f"DeepSpeed asked to build the op {self.name}")
OpBuilder.load = refuse_build
OpBuilder.jit_load = refuse_build
init_distributed(60)
ds_config = build_deepspeed_config(TrainConfig(), world_size=1, on_gpu=True)
params = ds_config["optimizer"]["params"]
assert params["torch_adam"] is True and params["fused"] is True, params
ds_config["zero_optimization"]["overlap_comm"] = False
model = torch.nn.Linear(8, 8)
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
inner = engine.optimizer.optimizer
print(json.dumps({"class": type(inner).__module__ + "." + type(inner).__name__, "fused": inner.param_groups[0]["fused"]}))
"""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built == {"class": "torch.optim.adamw.AdamW", "fused": True}


def test_caption_metrics_are_skipped_with_the_reason_without_java(monkeypatch, tmp_path, capsys):
    import torch

    from vlpdist.train.evaluate import score_captions

    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without Java (the GPU machine)
    embeddings = {"a": (torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0]])), "b": (torch.tensor([0.0, 1.0]), torch.tensor([[0.0, 1.0]]))}
    heldout = {"samples": 2, "caption_loss": 1.5, "lm_without_image_loss": 2.5, "references": {"a": ["a dog"], "b": ["a cat"]},
               "synthetic_references": {}, "predictions": {"a": "a dog", "b": "a dog"}, "embeddings": embeddings}
    result = score_captions(heldout, "a dog")
    assert result["caption_metrics_skipped"] == "no Java (pycocoevalcap's PTB tokenizer runs it)"
    assert (result["samples"], result["caption_loss"], result["lm_without_image_loss"]) == (2, 1.5, 2.5)
    assert result["metrics"] == {} and [e["generated"] for e in result["examples"]] == ["a dog", "a dog"]
    assert result["retrieval"] is not None  # retrieval needs neither
    assert "caption metrics skipped: no Java" in capsys.readouterr().out
