"""The run report: one self-contained static HTML page per run (`python -m launcher.report`), built
from the files a run leaves on disk (stats, decisions, feature and raw shards, metrics, eval.json)."""
