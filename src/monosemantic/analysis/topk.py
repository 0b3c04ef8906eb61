"""Per-group top-k kept on the fly: the one primitive behind the feature browser's examples.

The browser keeps, for every unit (feature or neuron), its highest activations, a uniform random sample of
its firings, and a few random firings per activation bin. All three are "the k best-scoring entries of each
group, over a stream", with a different group and score:

* top activations: group = unit, score = activation;
* a uniform sample without replacement: group = unit, score = an independent uniform random key (the k
  largest keys of a stream are a uniform sample of it: a bottom-k sketch);
* examples per activation bin: group = unit × bin, score = a random key.

:class:`GroupTopK` holds ``[G, k]`` scores and payload tensors and merges a batch of candidates with two
stable sorts, after dropping every candidate that cannot beat its group's current k-th score (after the
first batches that is nearly all of them, so the sort stays small).
"""

from __future__ import annotations

import torch


class GroupTopK:
    def __init__(self, n_groups: int, k: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype, float]]):
        """``payload``: name -> (trailing shape, dtype, fill value) of what is kept beside each score."""
        self.k = k
        self.score = torch.full((n_groups, k), -torch.inf)
        self.payload = {name: torch.full((n_groups, k, *shape), fill, dtype=dtype)
                        for name, (shape, dtype, fill) in payload.items()}

    @property
    def filled(self) -> torch.Tensor:
        """``[G, k]`` bool: which slots hold an entry (groups with fewer than k entries keep -inf slots)."""
        return torch.isfinite(self.score)

    def update(self, group_n: torch.Tensor, score_n: torch.Tensor, payload_fn) -> None:
        """Merge candidates ``(group_n, score_n)``; ``payload_fn(mask_n) -> {name: tensor [n_kept, ...]}`` is
        called only for the candidates that can enter (so expensive payloads are gathered for few rows)."""
        keep_n = score_n > self.score[group_n, -1]
        if not keep_n.any():
            return
        group_c, score_c = group_n[keep_n], score_n[keep_n]
        new = payload_fn(keep_n)
        touched = group_c.unique()
        # candidates: the touched groups' current k slots, then the new entries
        all_g = torch.cat([touched.repeat_interleave(self.k), group_c])
        all_s = torch.cat([self.score[touched].flatten(), score_c])
        order = torch.argsort(all_s, descending=True, stable=True)
        order = order[torch.argsort(all_g[order], stable=True)]  # by group, best score first within a group
        g_sorted = all_g[order]
        rank = torch.arange(len(order)) - torch.searchsorted(g_sorted, g_sorted)  # position within the group
        sel = rank < self.k  # every touched group has ≥ k candidates (its own slots), so all k are rewritten
        rows, cols, src = g_sorted[sel], rank[sel], order[sel]
        self.score[rows, cols] = all_s[src]
        for name, state in self.payload.items():
            merged = torch.cat([state[touched].flatten(0, 1), new[name].to(state.dtype)])
            state[rows, cols] = merged[src]
