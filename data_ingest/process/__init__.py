"""Processing stage: raw webdataset shards -> CLIP features, CapFilt decisions, object labels.

`run_process(config)` is the entry point (Ray, one task per shard); `feature_format` is the
contract with training.
"""

from data_ingest.process.run import run_process

__all__ = ["run_process"]
