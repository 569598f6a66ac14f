"""Distribution glue: DeepSpeed config and engine, launching, expert-parallel state naming, Slurm.

Model code imports only `expert_state` from here: the captioner's consolidated-state methods are thin
calls into it, so the renaming of experts per EP rank is written once, beside the engine that shards them.
"""
