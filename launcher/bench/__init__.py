"""The benchmarks: `python -m launcher.bench [--quick | --gpu] [--only ...] [--out DIR]` runs the suite.

- `suite`: the suite itself (sections, the report schema, bench.json and bench.md written as each ends);
- one module per section, each with its `run_benchmark` and its own single-purpose command
  (`python -m launcher.bench.<name>`): `ingest`, `clip`, `train` (with `clipcap`, ClipCap's own
  step), `mapper`, `geodesic`.

Nothing is imported here, so `python -m launcher.bench.<name>` loads only the section it runs.
"""
