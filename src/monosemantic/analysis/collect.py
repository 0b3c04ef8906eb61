"""One pass over text that gathers everything the feature browser and the interpretability proxies need.

A *unit set* is a map from MLP activations ``[N, d_mlp]`` to unit activations ``[N, U]``: the SAE's
features, the 512 neurons themselves, or a control (random directions). For each set, :class:`UnitAccumulator`
keeps, over a stream of token windows, with no second pass:

* counts: firings, activation sum and maximum per unit; activation mass per (unit, current token);
  a histogram of each unit's non-zero activations in log10 bins;
* the top ``n_top`` activations, each with the unit's activation on the ``ctx_before`` tokens before and
  ``ctx_after`` after it (same window), for the shaded contexts;
* ``per_bin`` random firings per log10 activation bin (examples across the whole activation range);
* a uniform random sample of ``n_sample`` firings per unit (the matched sample the proxies use, so a unit
  that fires often and one that fires rarely are judged on the same number of firings);
* optionally the features' co-activation sums, for Pearson correlations (sparse: cost ∝ L0², not d_sae²).

Locations are indices into the flat token array the pass reads (``loc``), so a context, its next token
and its window are recovered from that array afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from monosemantic.analysis.topk import GroupTopK
from monosemantic.errors import ConfigError

Encode = Callable[[torch.Tensor], torch.Tensor]

LOG10_LO, LOG10_HI, BINS_PER_DECADE = -4.0, 2.0, 6
N_BINS = int((LOG10_HI - LOG10_LO) * BINS_PER_DECADE)


def bin_edges() -> np.ndarray:
    """``[N_BINS + 1]`` log10 edges of the activation histogram (values outside go to the end bins)."""
    return np.linspace(LOG10_LO, LOG10_HI, N_BINS + 1)


def activation_bin(values: torch.Tensor) -> torch.Tensor:
    """Bin index of positive activations (clamped into the histogram's range)."""
    b = torch.floor((torch.log10(values.clamp_min(1e-30)) - LOG10_LO) * BINS_PER_DECADE)
    return b.clamp(0, N_BINS - 1).long()


@dataclass
class CollectSettings:
    n_top: int = 20
    """top activations kept per unit (shown as shaded contexts)"""
    n_sample: int = 128
    """uniform random firings kept per unit: the matched sample of the proxies"""
    per_bin: int = 2
    """random firings kept per unit and log10 activation bin (examples across the range)"""
    ctx_before: int = 12
    ctx_after: int = 4
    seed: int = 0


@dataclass
class UnitStats:
    """What one pass gathered for one unit set (CPU tensors)."""

    name: str
    n_tokens: int
    n_fires: torch.Tensor        # [U] int64
    act_sum: torch.Tensor        # [U] float64
    act_max: torch.Tensor        # [U]
    token_mass: torch.Tensor     # [U, V] activation summed by the token at the firing position
    hist: torch.Tensor           # [U, N_BINS] counts of non-zero activations per log10 bin
    top_act: torch.Tensor        # [U, n_top] (-inf where the unit fired fewer times)
    top_loc: torch.Tensor        # [U, n_top] int64 (-1 empty)
    top_ctx: torch.Tensor        # [U, n_top, C] the unit's activation around each top example
    bin_act: torch.Tensor        # [U, N_BINS, per_bin]
    bin_loc: torch.Tensor        # [U, N_BINS, per_bin]
    bin_ctx: torch.Tensor        # [U, N_BINS, per_bin, C]
    sample_act: torch.Tensor     # [U, n_sample] (0 in empty slots)
    sample_loc: torch.Tensor     # [U, n_sample] int64 (-1 empty)
    cofire: torch.Tensor | None = None  # [U, U] Σ_tokens f_i f_j (features only)
    extra: dict = field(default_factory=dict)

    @property
    def density(self) -> torch.Tensor:
        return self.n_fires.double() / max(self.n_tokens, 1)

    def correlation(self) -> torch.Tensor | None:
        """Pearson correlation ``[U, U]`` of the units' activations over the pass (None if not gathered)."""
        if self.cofire is None:
            return None
        n = max(self.n_tokens, 1)
        mean = self.act_sum / n
        cov = self.cofire.double() / n - mean[:, None] * mean[None, :]
        std = cov.diagonal().clamp_min(0).sqrt()
        return (cov / (std[:, None] * std[None, :]).clamp_min(1e-12)).float()


class UnitAccumulator:
    def __init__(self, name: str, n_units: int, vocab_size: int, settings: CollectSettings,
                 correlations: bool = False) -> None:
        for key in ("n_top", "n_sample", "per_bin"):
            if getattr(settings, key) < 1:
                raise ConfigError(f"collect.{key}={getattr(settings, key)} must be ≥ 1")
        self.name, self.U, self.V, self.s = name, n_units, vocab_size, settings
        self.C = settings.ctx_before + 1 + settings.ctx_after
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.n_tokens = 0
        self.n_fires = torch.zeros(n_units, dtype=torch.int64)
        self.act_sum = torch.zeros(n_units, dtype=torch.float64)
        self.act_max = torch.zeros(n_units)
        self.token_mass = torch.zeros(n_units, vocab_size)
        self.hist = torch.zeros(n_units, N_BINS, dtype=torch.int64)
        ctx = ((self.C,), torch.float16, 0.0)
        self.top = GroupTopK(n_units, settings.n_top, {"loc": ((), torch.int64, -1), "ctx": ctx})
        self.bins = GroupTopK(n_units * N_BINS, settings.per_bin, {"loc": ((), torch.int64, -1), "ctx": ctx,
                                                                  "act": ((), torch.float32, 0.0)})
        self.sample = GroupTopK(n_units, settings.n_sample, {"loc": ((), torch.int64, -1),
                                                            "act": ((), torch.float32, 0.0)})
        self.cofire = torch.zeros(n_units, n_units, dtype=torch.float64) if correlations else None

    @torch.no_grad()
    def update(self, acts_NU: torch.Tensor, tokens_N: torch.Tensor, loc_N: torch.Tensor, window_len: int) -> None:
        """One batch: unit activations ``[N, U]`` at the tokens ``tokens_N`` whose flat-array indices are
        ``loc_N``. Rows come in whole windows of ``window_len`` tokens (row ``n`` is position ``n % window_len``)."""
        acts_NU = acts_NU.float()
        N = acts_NU.shape[0]
        self.n_tokens += N
        self.act_max = torch.maximum(self.act_max, acts_NU.amax(0))
        n_idx, u_idx = (acts_NU > 0).nonzero(as_tuple=True)
        if n_idx.numel() == 0:
            return
        val = acts_NU[n_idx, u_idx]
        self.n_fires += torch.bincount(u_idx, minlength=self.U)
        self.act_sum += torch.bincount(u_idx, weights=val.double(), minlength=self.U)
        self.token_mass.view(-1).index_add_(0, u_idx * self.V + tokens_N[n_idx].long(), val)
        b_idx = activation_bin(val)
        self.hist.view(-1).index_add_(0, u_idx * N_BINS + b_idx, torch.ones_like(b_idx))

        offsets = torch.arange(-self.s.ctx_before, self.s.ctx_after + 1)
        pos_N = torch.arange(N) % window_len

        def context(mask: torch.Tensor) -> torch.Tensor:
            n, u = n_idx[mask], u_idx[mask]
            p = pos_N[n][:, None] + offsets[None, :]
            inside = (p >= 0) & (p < window_len)
            rows = (n[:, None] + offsets[None, :]).clamp(0, N - 1)
            return torch.where(inside, acts_NU[rows, u[:, None]], 0.0).half()

        loc = loc_N[n_idx]
        self.top.update(u_idx, val, lambda m: {"loc": loc[m], "ctx": context(m)})
        key = torch.rand(val.shape, generator=self.gen)
        self.bins.update(u_idx * N_BINS + b_idx, key,
                         lambda m: {"loc": loc[m], "ctx": context(m), "act": val[m]})
        key = torch.rand(val.shape, generator=self.gen)
        self.sample.update(u_idx, key, lambda m: {"loc": loc[m], "act": val[m]})
        if self.cofire is not None:
            sp = torch.sparse_coo_tensor(torch.stack([n_idx, u_idx]), val.double(), (N, self.U),
                                         check_invariants=False)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is checked in tests
                warnings.simplefilter("ignore", UserWarning)
                prod = torch.sparse.mm(sp.t().coalesce(), sp).coalesce()
            ij = prod.indices()  # only the co-firing pairs: cost ∝ Σ_tokens L0², never a dense d_sae² per batch
            self.cofire.view(-1).index_add_(0, ij[0] * self.U + ij[1], prod.values())

    def result(self) -> UnitStats:
        nb, k = N_BINS, self.s.per_bin
        return UnitStats(
            name=self.name, n_tokens=self.n_tokens, n_fires=self.n_fires, act_sum=self.act_sum,
            act_max=self.act_max, token_mass=self.token_mass, hist=self.hist,
            top_act=self.top.score, top_loc=self.top.payload["loc"], top_ctx=self.top.payload["ctx"],
            bin_act=self.bins.payload["act"].view(self.U, nb, k),
            bin_loc=self.bins.payload["loc"].view(self.U, nb, k),
            bin_ctx=self.bins.payload["ctx"].view(self.U, nb, k, self.C),
            sample_act=self.sample.payload["act"], sample_loc=self.sample.payload["loc"], cofire=self.cofire)


def token_windows(tokens: np.ndarray, window_len: int, batch_windows: int) -> Iterator[tuple[torch.Tensor, int]]:
    """Tiled, non-overlapping windows ``[B, window_len]`` of a flat token array, with each batch's first
    flat index. A trailing partial window is dropped."""
    n_windows = len(tokens) // window_len
    for w0 in range(0, n_windows, batch_windows):
        w1 = min(n_windows, w0 + batch_windows)
        chunk = np.asarray(tokens[w0 * window_len:w1 * window_len], dtype=np.int64)
        yield torch.from_numpy(chunk).view(w1 - w0, window_len), w0 * window_len


@torch.no_grad()
def collect(mlp_acts: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray, window_len: int,
            unit_sets: dict[str, tuple[Encode, int, bool]], vocab_size: int, settings: CollectSettings,
            batch_windows: int = 64, progress: bool = True, device: str | torch.device = "cpu"
            ) -> dict[str, UnitStats]:
    """Run ``mlp_acts(tokens_BT) -> [B, T, M]`` over the tiled windows of ``tokens`` and accumulate every
    unit set (``name -> (encode, n_units, gather correlations)``)."""
    from tqdm.auto import tqdm

    accs = {name: UnitAccumulator(name, n, vocab_size, settings, corr) for name, (_, n, corr) in unit_sets.items()}
    n_windows = len(tokens) // window_len
    bar = tqdm(total=n_windows * window_len, desc="dashboard pass", unit="tok", unit_scale=True, disable=not progress)
    for tokens_BT, start in token_windows(tokens, window_len, batch_windows):
        # the model and the encoders run on `device`; the accumulators keep their state on the CPU
        acts_NM = mlp_acts(tokens_BT.to(device)).flatten(0, 1).float()
        tokens_N = tokens_BT.flatten()
        loc_N = start + torch.arange(len(tokens_N))
        for name, (encode, _, _) in unit_sets.items():
            accs[name].update(encode(acts_NM).cpu(), tokens_N, loc_N, window_len)
        bar.update(len(tokens_N))
    bar.close()
    return {name: acc.result() for name, acc in accs.items()}


def random_directions(d_in: int, n: int, seed: int) -> torch.Tensor:
    """``[d_in, n]`` unit columns drawn uniformly on the sphere: the control's "dictionary"."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d_in, n, generator=g)
    return r / r.norm(dim=0, keepdim=True)
