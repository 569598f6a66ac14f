"""A frozen LM's text features of captions, computed once per (sample, caption) and kept on the training device.

With a frozen LM a caption's mean-pooled hidden states never change (the captioner keeps a frozen
LM in eval mode, so a row is the LM's feature, not one dropout draw of it), so ITC's text side need
not cost an LM forward every step. The index lives on the host (a dict from (sample id, caption index)
to a row), so deciding whether a batch is all cached costs no device sync; the rows live on the
device. Once `capacity` rows are taken, further captions are computed every time they come.
A cached row was computed inside some earlier batch, so its last bits may differ from a fresh
forward in another batch (kernels see other shapes): resume stays exact only with text_target lm or clip.
"""

from __future__ import annotations

import torch


class TextFeatureCache:
    def __init__(self, capacity: int, width: int, device: torch.device):
        self.capacity = capacity
        self.features_ND = torch.zeros(0, width, device=device)  # grown in chunks up to capacity
        self.row_of: dict[tuple[int, int], int] = {}
        self.hits = self.misses = 0

    def rows(self, sample_ids_B: torch.Tensor, caption_index_B: torch.Tensor) -> list[int] | None:
        """The cached rows of a batch (host tensors in, no device work), or None when any is missing."""
        rows = [self.row_of.get(pair) for pair in zip(sample_ids_B.tolist(), caption_index_B.tolist())]
        if any(row is None for row in rows):
            self.misses += 1
            return None
        self.hits += 1
        return rows

    def lookup(self, rows: list[int]) -> torch.Tensor:
        index_B = torch.tensor(rows, dtype=torch.long).to(self.features_ND.device, non_blocking=True)
        return self.features_ND.index_select(0, index_B)

    def store(self, sample_ids_B: torch.Tensor, caption_index_B: torch.Tensor, features_BD: torch.Tensor) -> None:
        """Keep the rows not yet cached (while there is room)."""
        new = [(i, pair) for i, pair in enumerate(zip(sample_ids_B.tolist(), caption_index_B.tolist())) if pair not in self.row_of]
        new = new[: max(self.capacity - len(self.row_of), 0)]
        if not new:
            return
        start = len(self.row_of)
        needed = start + len(new)
        if needed > self.features_ND.shape[0]:
            grown = min(self.capacity, max(needed, 2 * self.features_ND.shape[0], 1024))
            bigger = self.features_ND.new_zeros(grown, self.features_ND.shape[1])
            bigger[: self.features_ND.shape[0]] = self.features_ND
            self.features_ND = bigger
        batch_rows = torch.tensor([i for i, _ in new], dtype=torch.long, device=features_BD.device)
        self.features_ND[start:needed] = features_BD.detach().float().index_select(0, batch_rows)
        for offset, (_, pair) in enumerate(new):
            self.row_of[pair] = start + offset
