"""Monitoring: TensorBoard scalars and text, written by rank 0."""
