"""Distribution glue: DeepSpeed config and engine, launching, Slurm. Model code never imports this."""
