"""Loss terms and their distributed state: each loss takes its data-parallel context explicitly
(as open_clip's `ClipLoss` takes rank and world size), owns its gathers, and returns named terms;
the training loop weights, sums and logs whatever terms it is given."""
