"""Evaluation: captioning metrics (pycocoevalcap) and the trivial baselines they are compared against."""
