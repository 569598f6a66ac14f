"""The benchmark suite for real: `python -m launcher.bench --quick` in a fresh interpreter writes
bench.json, valid against the suite's schema, with every section run (or saying why it could not),
and bench.md with a summary row per section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from launcher.bench import BENCH_SCHEMA, SECTIONS

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
        assert all(item["ratio"] is None or item["ratio"] > 0 for item in section["summary"]), name
    clip = report["sections"]["clip"]["detail"]["clip_retrieval"]
    assert clip["available"] or clip["reason"].startswith("clip-retrieval does not import here")
    train = {item["vs"] for item in report["sections"]["train"]["summary"]}
    assert {"bare LM fwd+bwd", "full, alignment off", "share of the aligned step", "bare LM fwd+bwd, compiled",
            "full, alignment off, eager", "full, alignment off (fused torch AdamW, the CPU default)"} <= train
    train_detail = report["sections"]["train"]["detail"]
    assert train_detail["optimizer"] == {"class": "AdamW", "fused": True}  # what the CPU default builds through DeepSpeed
    assert train_detail["larger_batch"]["batch"] == 4 * train_detail["batch"]
    assert (train_detail["mapper"]["experts"], train_detail["mapper"]["top_k"]) == (8, 2)  # the CC3M recipe's MoE
    markdown = (out / "bench.md").read_text().splitlines()
    for name in SECTIONS:
        assert any(line.startswith(f"| {name} | ") for line in markdown), name


def test_schema_refuses_a_section_without_figures():
    report = {"mode": "quick", "command": "x", "machine": {"cpu": "c", "cores": 2, "python": "3", "torch": "t", "deepspeed": None,
                                                          "transformers": None, "gpu": None},
              "sections": {"train": {"status": "ok", "reason": None, "seconds": 1.0, "summary": [], "detail": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, BENCH_SCHEMA)
