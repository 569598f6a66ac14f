"""Processing stage: raw webdataset shards -> CLIP features, CapFilt decisions, object labels.

`run_process(config)` is the entry point (a pool of Ray actors, each running one shard at a
time); the feature shards it writes follow `vlpdist/data/feature_format.py`, the contract with training.
"""

from data_ingest.process.run import run_process

__all__ = ["run_process"]
