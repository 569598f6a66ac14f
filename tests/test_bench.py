"""The benchmark suite for real: `python -m launcher.bench --quick` in a fresh interpreter writes
bench.json, valid against the suite's schema, with every section run (or saying why it could not),
and bench.md with a summary row per section; each section's files are on disk as soon as it
finishes, so a run killed in a later section keeps them; a rerun reuses its --out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from launcher.bench.suite import BENCH_SCHEMA, SECTIONS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parent.parent


def test_quick_suite_writes_valid_json_and_a_row_per_section(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "launcher.bench", "--quick", "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    jsonschema.validate(report, BENCH_SCHEMA)
    assert report["mode"] == "quick" and list(report["sections"]) == list(SECTIONS)
    for name, section in report["sections"].items():
        # Only clip-retrieval may be missing here, and then inside an ok clip section that says why.
        assert section["status"] == "ok", (name, section["reason"])
        # Shares of the aligned step left after subtracting the pieces measured alone are clamped at 0 under load.
        assert all(item["ratio"] is None or item["ratio"] > 0 or (item["vs"] == "share of the aligned step" and item["ratio"] == 0)
                   for item in section["summary"]), name
    clip = report["sections"]["clip"]["detail"]
    assert clip["clip_retrieval"]["available"] or clip["clip_retrieval"]["reason"].startswith("clip-retrieval does not import here")
    # The stage and the bare tower both with the model loaded before the clock, on the same images.
    timed = {r["name"]: r["images"] for r in clip["rows"]}
    assert timed["vlpdist ShardProcessor, 1 process, model loaded, workers started"] == timed["bare CLIP image tower"] == 100
    train = {item["vs"] for item in report["sections"]["train"]["summary"]}
    assert {"bare LM fwd+bwd", "full, alignment off", "share of the aligned step", "bare LM fwd+bwd, compiled",
            "full, alignment off, eager", "full, alignment off (torch AdamW (fused), the default)"} <= train
    train_detail = report["sections"]["train"]["detail"]
    # What the default builds through DeepSpeed, and ClipCap's step gets the same implementation.
    assert train_detail["optimizer"]["name"] == "torch AdamW (fused)" and train_detail["optimizer"]["fused"]
    clipcap = train_detail["clipcap"]
    assert clipcap["optimizer"] == train_detail["optimizer"] and clipcap["layers"] == 8 and clipcap["precision"] == "fp32"
    geometry = {(v["prefix_length"], v["clip_length"], v["lm_weight_grads"]) for v in clipcap["variants"]}
    assert {(40, 40, True), (10, 10, True)} <= geometry  # its COCO recipe, and the same at prefix 10
    # ClipCap's recipe maps 512 -> 40 x width tokens and learns 40 constant tokens: more than the prefix-10 mapper.
    params = {v["prefix_length"]: v["trainable_params"] for v in clipcap["variants"] if v["lm_weight_grads"]}
    assert params[40] > params[10]
    rows = {r["name"]: r for r in train_detail["rows"]}
    for name in ("ClipCap step, prefix 40/40", "ClipCap step, prefix 10/10"):
        assert rows[name]["ms"] > 0
        figures = {f"full step vs {name}, batch {batch}" for batch in (train_detail["batch"], 4 * train_detail["batch"])}
        versus = [item for item in report["sections"]["train"]["summary"] if item["figure"] in figures]
        assert len(versus) == 2  # at the batch and at 4x the batch
        assert all("torch AdamW (fused) as ours" in item["vs"] and item["ratio"] > 0 for item in versus), versus
    assert train_detail["larger_batch"]["batch"] == 4 * train_detail["batch"]
    assert (train_detail["mapper"]["experts"], train_detail["mapper"]["top_k"]) == (8, 2)  # the CC3M recipe's MoE
    markdown = (out / "bench.md").read_text().splitlines()
    for name in SECTIONS:
        assert any(line.startswith(f"| {name} | ") for line in markdown), name
        own = json.loads((out / "sections" / f"{name}.json").read_text())
        jsonschema.validate(own, BENCH_SCHEMA)
        assert list(own["sections"]) == [name] and own["sections"][name] == report["sections"][name]
        assert (out / "sections" / f"{name}.md").read_text().splitlines()[2].startswith(f"| {name} | ")
    assert report["schema_checked"] is True


def test_clipcap_mapper_has_its_recipe_geometry():
    from launcher.bench.clipcap import RECIPE, ClipCapTransformerMapper

    width, prefix = 768, RECIPE["prefix_length"]
    mapper = ClipCapTransformerMapper(512, width, prefix, RECIPE["clip_length"], RECIPE["num_layers"])
    assert mapper(torch.randn(3, 512)).shape == (3, prefix, width)
    # Its parameters, counted from its train.py: the CLIP linear map, the constant tokens, and per layer two
    # LayerNorms, bias-free queries and keys/values, the output projection and an MLP of ratio 2.
    per_layer = 2 * 2 * width + 3 * width * width + width * width + width + (width * 2 * width + 2 * width) + (2 * width * width + width)
    expected = 512 * prefix * width + prefix * width + prefix * width + RECIPE["num_layers"] * per_layer
    assert sum(p.numel() for p in mapper.parameters()) == expected


def bench_command(*arguments: str, without_jsonschema: bool = False) -> list[str]:
    if without_jsonschema:  # as on a bare GPU machine: `import jsonschema` fails
        code = "import sys; sys.modules['jsonschema'] = None; from launcher.bench.suite import main; sys.exit(main(sys.argv[1:]))"
        return [sys.executable, "-c", code, *arguments]
    return [sys.executable, "-m", "launcher.bench", *arguments]


def test_a_killed_run_keeps_its_finished_sections_and_a_rerun_reuses_its_out(tmp_path):
    out, work = tmp_path / "bench", tmp_path / "work"
    # clip (seconds at --quick) then train (DeepSpeed engines): killed once clip's files are in place.
    running = subprocess.Popen(bench_command("--quick", "--only", "clip,train", "--out", str(out), "--work", str(work)), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = []
    for line in running.stdout:  # the bench says a section is written only once its files are in place
        log.append(line)
        if line.startswith("[bench] clip: "):
            break
    os.killpg(running.pid, signal.SIGKILL)
    running.wait()
    assert log and log[-1].startswith("[bench] clip: ok"), "".join(log[-30:])
    for report in (json.loads((out / "sections" / "clip.json").read_text()), json.loads((out / "bench.json").read_text())):
        jsonschema.validate(report, BENCH_SCHEMA)
        assert list(report["sections"]) == ["clip"] and report["sections"]["clip"]["status"] == "ok"
    assert "| clip | CLIP stage images/s" in (out / "sections" / "clip.md").read_text()
    assert "| clip | " in (out / "bench.md").read_text()

    # A rerun on the same --out, where jsonschema is absent: it says so, and the last run's section files go.
    done = subprocess.run(bench_command("--quick", "--only", "geodesic", "--out", str(out), "--work", str(work), without_jsonschema=True),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "jsonschema is not installed" in done.stdout
    report = json.loads((out / "bench.json").read_text())
    assert report["schema_checked"] is False and list(report["sections"]) == ["geodesic"]
    jsonschema.validate(report, BENCH_SCHEMA)
    assert sorted(path.name for path in (out / "sections").iterdir()) == ["geodesic.json", "geodesic.md"]
    assert "NOT schema-checked" in (out / "bench.md").read_text()


def test_out_holding_something_else_is_refused_before_any_measurement(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not the benchmark's")
    done = subprocess.run(bench_command("--quick", "--only", "mapper", "--out", str(out)), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: --out ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


@pytest.mark.gpu
def test_brute_force_knn_blocks_at_a_million_nodes_are_large_on_the_gpu():
    import torch

    from vlpdist.geodesic.knn import similarity_block_rows

    # 1M nodes in blocks of 64 rows (the CPU's 256 MiB budget) would be 16,384 GEMM + top-k launches.
    assert similarity_block_rows(1 << 20, torch.device("cuda")) >= 1024


def test_schema_refuses_a_section_without_figures():
    report = {"mode": "quick", "command": "x", "machine": {"cpu": "c", "cores": 2, "python": "3", "torch": "t", "deepspeed": None,
                                                          "transformers": None, "gpu": None},
              "sections": {"train": {"status": "ok", "reason": None, "seconds": 1.0, "summary": [], "detail": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, BENCH_SCHEMA)
