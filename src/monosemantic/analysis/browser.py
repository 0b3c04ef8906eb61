"""The static feature browser: ``index.html`` plus ``data/<units>-<chunk>.js``, opened from disk with no server.

``index.html`` carries the tables (one row per unit: density, activations, top tokens, label, proxies), the
vocabulary and the plots, with the browser's script and style inlined. Each unit's page (shaded contexts,
examples across its activation range, histogram, logit effect, top neurons, correlated features) lives in a
chunk file of ``CHUNK`` units that the page loads with a ``<script>`` tag when it is first opened: ``file://``
pages may load scripts beside them, where ``fetch`` would be refused, and the index stays small.
"""

from __future__ import annotations

import base64
import html
import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from monosemantic.analysis.collect import N_BINS, UnitStats, bin_edges
from monosemantic.utils.io import atomic_dir

CHUNK = 128
N_LOGIT = 10
N_LINKS = 6


def token_strings(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """How each token reads on its own (a lone byte of a multi-byte character shows as its byte value)."""
    out = []
    for i in range(vocab_size):
        s = tokenizer.decode([i])
        out.append(s if "\ufffd" not in s else (tokenizer.id_to_token(i) or f"<{i}>"))
    return out


def unit_label(top_tokens: list[int], vocab: list[str], n: int = 3) -> str:
    """A short automatic label: the commonest tokens at the unit's strongest activations."""
    ids, counts = np.unique(np.asarray(top_tokens, dtype=np.int64), return_counts=True)
    order = np.argsort(-counts, kind="stable")[:n]
    return " · ".join(repr(vocab[ids[i]])[1:-1] if vocab[ids[i]].strip() else repr(vocab[ids[i]]) for i in order)


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _contexts(tokens: np.ndarray, loc: torch.Tensor, ctx: torch.Tensor, act: torch.Tensor, unit_max: float,
              before: int, window_len: int) -> list[list]:
    """Rows ``[value, token ids, shades 0–100 of the unit's max]`` for the filled example slots."""
    rows = []
    C = ctx.shape[-1]
    for l, c, a in zip(loc.tolist(), ctx.float().tolist(), act.tolist()):
        if l < 0:
            continue
        start = l - before
        w0 = l - l % window_len
        ids = [int(tokens[start + j]) if w0 <= start + j < w0 + window_len else -1 for j in range(C)]
        shade = [round(100 * v / unit_max) if unit_max > 0 else 0 for v in c]
        rows.append([_round(a), ids, shade])
    return rows


def unit_rows(stats: UnitStats, tokens: np.ndarray, vocab: list[str], proxy_values: dict[str, torch.Tensor],
              n_show: int = 3) -> dict[str, list]:
    """The table's columns for one unit set."""
    n = stats.n_fires
    mean = (stats.act_sum / n.clamp_min(1)).float()
    mass = stats.token_mass
    share = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    top_share, top_tok = share.topk(n_show, dim=1)
    labels, top_tokens = [], []
    for u in range(len(n)):
        locs = stats.top_loc[u][stats.top_loc[u] >= 0].numpy()
        labels.append(unit_label(tokens[locs], vocab) if len(locs) else "")
        top_tokens.append([[int(t), _round(float(s), 3)] for t, s in zip(top_tok[u], top_share[u]) if s > 0])
    cols = {"density": [_round(float(d)) for d in stats.density], "n_fires": n.tolist(),
            "max": [_round(float(x)) for x in stats.act_max], "mean": [_round(float(x)) for x in mean],
            "top_tokens": top_tokens, "label": labels}
    for name in ("token_specificity", "context_consistency", "logit_coherence"):
        cols[name] = [None if np.isnan(v) else _round(v, 3) for v in proxy_values[name].tolist()]
    return cols


def unit_pages(stats: UnitStats, tokens: np.ndarray, window_len: int, logit_effect_UV: torch.Tensor,
               before: int, decoder_FM: torch.Tensor | None = None, corr_FF: torch.Tensor | None = None) -> list[dict]:
    """Everything a unit's page shows, one dict per unit."""
    pos_v, pos_t = logit_effect_UV.topk(N_LOGIT, dim=1)
    neg_v, neg_t = (-logit_effect_UV).topk(N_LOGIT, dim=1)
    hist_cdf = stats.hist.cumsum(1).double() / stats.hist.sum(1, keepdim=True).clamp_min(1)
    pages = []
    for u in range(stats.n_fires.numel()):
        umax = float(stats.act_max[u])
        page = {"top": _contexts(tokens, stats.top_loc[u], stats.top_ctx[u], stats.top_act[u], umax, before,
                                 window_len),
                "logit_pos": [[int(t), _round(float(v), 3)] for t, v in zip(pos_t[u], pos_v[u])],
                "logit_neg": [[int(t), _round(-float(v), 3)] for t, v in zip(neg_t[u], neg_v[u])]}
        # examples across the range: a few random firings per log10 bin, labelled by the bin's quantile
        quant = []
        for b in range(N_BINS - 1, -1, -1):
            for row in _contexts(tokens, stats.bin_loc[u, b], stats.bin_ctx[u, b], stats.bin_act[u, b], umax,
                                 before, window_len):
                quant.append([round(100 * float(hist_cdf[u, b]))] + row)
        page["quantiles"] = sorted(quant, key=lambda r: -r[1])
        nz = stats.hist[u].nonzero().flatten()
        if nz.numel():
            lo, hi = int(nz[0]), int(nz[-1]) + 1
            page["hist"] = [lo, stats.hist[u, lo:hi].tolist()]
        if decoder_FM is not None:
            w = decoder_FM[u]
            idx = w.abs().topk(min(N_LINKS, w.numel())).indices
            page["neurons"] = [[int(j), _round(float(w[j]), 3)] for j in idx]
        if corr_FF is not None:
            r = corr_FF[u].clone()
            r[u] = -2
            val, idx = r.topk(min(N_LINKS, r.numel() - 1))
            page["corr"] = [[int(j), _round(float(v), 3)] for j, v in zip(idx, val) if v > -1]
        pages.append(page)
    return pages


def write_browser(out_dir: Path, meta: dict, vocab: list[str], tables: dict[str, dict],
                  pages: dict[str, list[dict]], images: dict[str, bytes],
                  files: dict[str, bytes] | None = None) -> Path:
    """Write the browser into ``out_dir`` (replaced whole, atomically); returns the path of ``index.html``.

    ``images`` (PNG bytes) are inlined into the index; ``files`` are written beside it."""
    asset = resources.files("monosemantic.analysis")
    script = (asset / "browser.js").read_text()
    style = (asset / "browser.css").read_text()
    data = {"meta": meta, "vocab": vocab, "tables": tables, "chunk": CHUNK,
            "edges": [round(float(e), 4) for e in bin_edges()],
            "images": {k: "data:image/png;base64," + base64.b64encode(b).decode() for k, b in images.items()}}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"monosemantic · {meta.get('sae_name', 'SAE')} feature browser")
    doc = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{title}</title>"
           f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{style}</style></head>"
           f"<body><div id=app>Loading…</div><script>window.MS={payload};</script><script>{script}</script>"
           "</body></html>")
    with atomic_dir(out_dir) as tmp:
        (tmp / "data").mkdir()
        for kind, unit_pages_ in pages.items():
            for c in range(0, len(unit_pages_), CHUNK):
                body = json.dumps(unit_pages_[c:c + CHUNK], separators=(",", ":")).replace("</", "<\\/")
                (tmp / "data" / f"{kind}-{c // CHUNK:04d}.js").write_text(
                    f"MSLoaded({json.dumps(kind)},{c // CHUNK},{body});")
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content)
        (tmp / "index.html").write_text(doc)
    return out_dir / "index.html"
