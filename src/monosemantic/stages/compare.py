"""The compare stage, ``src/compare.py``: the units of several SAEs matched on the same tokens, in one pass.

* **Feature splitting** (SAEs of one transformer, e.g. the dictionary-size series A/0…A/5): for each feature
  of the smaller SAE, its nearest features in the larger one by decoder cosine and by activation correlation,
  with their labels, and how many larger features it split into.
* **Universality** (SAEs of two transformers trained alike): for each feature of A, the best-matching feature
  of B by activation correlation, and the same for the two transformers' neurons; the paper reports medians
  of 0.72 for features and 0.46 for neurons.

Writes ``compare.json`` (summaries and, for each pair, the smaller SAE's per-feature neighbours),
``compare.png`` and ``compare.html`` (the neighbours as a table, sorted by how far each feature split) in the
run folder. With ``browsers=`` (one ``src/dashboard.py`` run folder per SAE) every feature id on the page opens
that feature's page in its SAE's feature browser.
"""

from __future__ import annotations

import html
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, ListConfig

from monosemantic.analysis.browser import token_strings, unit_label
from monosemantic.analysis.collect import token_windows
from monosemantic.analysis.matching import CrossCorrelation, best_matches, children, decoder_cosine, summary
from monosemantic.analysis.topk import GroupTopK
from monosemantic.errors import ConfigError, InputError
from monosemantic.stages.inputs import ReadingInputs, load_inputs, read_text
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)


def _listed(value, n: int, key: str) -> list:
    if value is None:
        return [None] * n
    values = list(value) if isinstance(value, ListConfig | list | tuple) else [value] * n
    if len(values) != n:
        raise ConfigError(f"{key} names {len(values)} entries for {n} SAEs: give one per SAE, or one for all")
    return values


def pairs_of(mode: str, n: int) -> list[tuple[int, int]]:
    """Which SAEs are matched: ``consecutive`` (0→1, 1→2, … a size series), ``all`` (every i < j) or
    ``first`` (0 against each other)."""
    if mode == "consecutive":
        return [(i, i + 1) for i in range(n - 1)]
    if mode == "all":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if mode == "first":
        return [(0, j) for j in range(1, n)]
    raise ConfigError(f"pairs={mode!r}: one of consecutive, all, first")


class _Labels:
    """Each unit's top activations' token positions, for the browser's automatic label."""

    def __init__(self, n_units: int, k: int = 20) -> None:
        self.top = GroupTopK(n_units, k, {"loc": ((), torch.int64, -1)})
        self.n_fires = torch.zeros(n_units, dtype=torch.int64)

    def update(self, acts_NU: torch.Tensor, loc_N: torch.Tensor) -> None:
        n, u = (acts_NU > 0).nonzero(as_tuple=True)
        self.n_fires += torch.bincount(u, minlength=self.n_fires.numel())
        loc = loc_N[n]
        self.top.update(u, acts_NU[n, u].float(), lambda m: {"loc": loc[m]})

    def labels(self, tokens: np.ndarray, vocab: list[str]) -> list[str]:
        out = []
        for locs in self.top.payload["loc"]:
            locs = locs[locs >= 0].numpy()
            out.append(unit_label(tokens[locs], vocab) if len(locs) else "")
        return out


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    start = time.time()
    paths = list(cfg.saes or [])
    if len(paths) < 2:
        raise ConfigError(f"saes={paths}: name at least two SAE exports (or .ckpt files) to compare")
    shards = _listed(cfg.shards, len(paths), "shards")
    transformers = _listed(cfg.transformers, len(paths), "transformers")
    browsers = [browser_index(b) if b else None for b in _listed(cfg.get("browsers"), len(paths), "browsers")]
    inputs: list[ReadingInputs] = [load_inputs(str(p), cfg.paths.log_dir, s, t, cfg.token_store, cfg.device)
                                   for p, s, t in zip(paths, shards, transformers)]
    vocab_sizes = {inp.transformer.cfg.vocab_size for inp in inputs}
    if len(vocab_sizes) > 1:
        raise ConfigError(f"the SAEs' transformers have different vocabularies ({sorted(vocab_sizes)}): they "
                          "cannot read the same tokens")
    stores = {str(inp.token_store) for inp in inputs}
    if len(stores) > 1:
        log.warning("the SAEs come with different token stores %s; all read %s", sorted(stores), inputs[0].token_store)
    T = min(inp.n_ctx for inp in inputs)
    tokens, _, by_split = read_text(inputs[0].token_store, int(cfg.n_tokens), T)
    nets = {str(inp.transformer_dir): inp.transformer for inp in inputs}
    net_of = [str(inp.transformer_dir) for inp in inputs]
    pairs = pairs_of(cfg.pairs, len(inputs))
    log.info("comparing %d SAEs (%s) on %s tokens (%s), pairs %s", len(inputs),
             ", ".join(f"{inp.sae.d_sae}" for inp in inputs), f"{len(tokens):,}",
             ", ".join(f"{v:,} {k}" for k, v in by_split.items()), pairs)

    feats_corr = {(i, j): CrossCorrelation(inputs[i].sae.d_sae, inputs[j].sae.d_sae) for i, j in pairs}
    neuron_pairs = sorted({(net_of[i], net_of[j]) for i, j in pairs if net_of[i] != net_of[j]})
    neurons_corr = {p: CrossCorrelation(inputs[0].sae.d_in, inputs[0].sae.d_in) for p in neuron_pairs}
    labels = [_Labels(inp.sae.d_sae) for inp in inputs]

    from tqdm.auto import tqdm
    bar = tqdm(total=len(tokens) // T * T, desc="compare pass", unit="tok", unit_scale=True,
               disable=not cfg.get("progress", True))
    for tokens_BT, first in token_windows(tokens, T, int(cfg.batch_windows)):
        acts = {k: net.mlp_acts(tokens_BT.to(cfg.device)).flatten(0, 1).float() for k, net in nets.items()}
        feats = [inp.sae.encode(acts[net_of[i]]).float().cpu() for i, inp in enumerate(inputs)]
        loc_N = first + torch.arange(tokens_BT.numel())
        for i, lab in enumerate(labels):
            lab.update(feats[i], loc_N)
        for (i, j), cc in feats_corr.items():
            cc.update(feats[i], feats[j])
        for (a, b), cc in neurons_corr.items():
            cc.update(acts[a].cpu(), acts[b].cpu())
        bar.update(tokens_BT.numel())
    bar.close()
    pass_s = time.time() - start

    vocab = token_strings(inputs[0].tokenizer, inputs[0].transformer.cfg.vocab_size)
    names = [_name(inp.sae_path) for inp in inputs]
    feature_labels = [lab.labels(tokens, vocab) for lab in labels]
    min_fires = int(cfg.min_fires)
    k = int(cfg.top_k)
    result: dict = {"saes": [{"path": str(inp.sae_path), "name": n, "d_sae": inp.sae.d_sae,
                              "transformer": str(inp.transformer_dir),
                              "n_alive": int((lab.n_fires >= min_fires).sum())}
                             for inp, n, lab in zip(inputs, names, labels)],
                    "n_tokens": len(tokens), "tokens_by_split": by_split, "min_fires": min_fires,
                    "split_cosine": float(cfg.split_cosine), "pairs": []}
    figure_rows = []
    for (i, j), cc in feats_corr.items():
        corr = cc.result()
        alive_i = labels[i].n_fires >= min_fires
        alive_j = labels[j].n_fires >= min_fires
        corr = corr * alive_j[None, :]  # a match must be a feature that fired enough to be judged
        corr_v, corr_idx = best_matches(corr, k)
        same_space = net_of[i] == net_of[j]
        pair = {"a": i, "b": j, "same_transformer": same_space,
                "feature_best_correlation": summary(corr_v[:, 0], alive_i)}
        panel = {"title": f"{names[i]} → {names[j]}", "corr": corr_v[alive_i, 0]}
        if same_space:
            cos = decoder_cosine(inputs[i].sae.W_dec.cpu(), inputs[j].sae.W_dec.cpu())
            cos_v, cos_idx = best_matches(cos, k)
            kids = children(cos, float(cfg.split_cosine))
            pair.update({"feature_best_cosine": summary(cos_v[:, 0], alive_i),
                         "children": {"mean": float(kids[alive_i].float().mean()),
                                      "share_split": float((kids[alive_i] >= 2).float().mean()),
                                      "share_none": float((kids[alive_i] == 0).float().mean()),
                                      "histogram": torch.bincount(kids[alive_i].clamp_max(10), minlength=11).tolist()}})
            panel.update({"cos": cos_v[alive_i, 0], "children": kids[alive_i]})
        else:
            nc = neurons_corr[(net_of[i], net_of[j])].result()
            n_alive = (nc.abs().sum(1) > 0)
            pair["neuron_best_correlation"] = summary(nc.max(dim=1).values, n_alive)
            panel["neurons"] = nc.max(dim=1).values[n_alive]
        rows = []
        for f in torch.nonzero(alive_i).flatten().tolist():
            row = {"feature": f, "label": feature_labels[i][f], "fires": int(labels[i].n_fires[f]),
                   "by_correlation": [[int(g), round(float(v), 4), feature_labels[j][g]]
                                      for v, g in zip(corr_v[f], corr_idx[f])]}
            if same_space:
                row["children"] = int(kids[f])
                row["by_cosine"] = [[int(g), round(float(v), 4), feature_labels[j][g]]
                                    for v, g in zip(cos_v[f], cos_idx[f])]
            rows.append(row)
        pair["features"] = rows
        result["pairs"].append(pair)
        figure_rows.append(panel)
        best = pair["feature_best_correlation"].get("median", 0.0)
        msg = f"{names[i]} → {names[j]}: median best correlation {best:.3f}"
        if same_space:
            msg += (f", median best decoder cosine {pair['feature_best_cosine']['median']:.3f}, "
                    f"{pair['children']['share_split']:.1%} split into ≥ 2 (cosine ≥ {cfg.split_cosine})")
        else:
            msg += f"; neurons {pair['neuron_best_correlation'].get('median', 0):.3f}"
        log.info(msg)

    out = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = comparison_figure(figure_rows, float(cfg.split_cosine))
    fig.savefig(out / "compare.png", dpi=110)
    links = [os.path.relpath(b, out.resolve()) if b else None for b in browsers]
    (out / "compare.html").write_text(comparison_html(result, names, links))
    result["pass_seconds"] = round(pass_s, 1)
    result["wall_seconds"] = round(time.time() - start, 1)
    write_json_atomic(out / "compare.json", result)
    print(f"comparison: {out / 'compare.html'}  ({out / 'compare.png'})")
    return {k: v for k, v in result.items() if k != "pairs"} | {
        "pairs": [{k: v for k, v in p.items() if k != "features"} for p in result["pairs"]]}


def _name(path: Path) -> str:
    run = path.parent if path.name == "export" else path
    return f"{run.name} ({run.parent.name})" if run.parent.name else run.name


def comparison_figure(rows: list[dict], split_cosine: float) -> Figure:
    """One row per pair: the best match's decoder cosine (one transformer) or the neurons' best correlation
    (two transformers) beside the features' best activation correlation, and how many features each split
    into."""
    fig = Figure(figsize=(12, 2.8 * len(rows)), tight_layout=True)
    FigureCanvasAgg(fig)
    for r, row in enumerate(rows):
        ax = fig.add_subplot(len(rows), 3, 3 * r + 1)
        ax.hist(row["corr"].numpy(), bins=50, range=(0, 1), color="tab:blue", alpha=0.8, label="features")
        if "neurons" in row:
            ax.hist(row["neurons"].numpy(), bins=50, range=(0, 1), color="tab:gray", alpha=0.7, label="neurons")
        ax.set_title(f"{row['title']}: best activation correlation", fontsize=8)
        ax.legend(fontsize=7)
        ax2 = fig.add_subplot(len(rows), 3, 3 * r + 2)
        if "cos" in row:
            ax2.hist(row["cos"].numpy(), bins=50, range=(0, 1), color="tab:green")
            ax2.axvline(split_cosine, color="k", lw=0.8, ls="--")
            ax2.set_title("best decoder cosine", fontsize=8)
            ax3 = fig.add_subplot(len(rows), 3, 3 * r + 3)
            kids = row["children"].clamp_max(10)
            ax3.bar(range(11), torch.bincount(kids, minlength=11).numpy(), color="tab:orange")
            ax3.set_xticks(range(11), [str(i) for i in range(10)] + ["10+"])
            ax3.set_title(f"larger features nearest to each (cosine ≥ {split_cosine})", fontsize=8)
        else:
            ax2.axis("off")
            ax2.text(0.02, 0.5, "two transformers: decoder rows live in\ndifferent spaces, so only correlations",
                     fontsize=8)
    return fig


def browser_index(path: str | Path) -> Path:
    """The ``index.html`` of a feature browser (``src/dashboard.py``'s ``browser/`` folder, the dashboard run
    folder above it, or the file itself), absolute."""
    p = Path(path)
    for cand in (p, p / "index.html", p / "browser" / "index.html"):
        if cand.is_file() and cand.name == "index.html":
            return cand.resolve()
    raise InputError(f"browsers: {p} holds no feature browser (index.html, or browser/index.html): run "
                     f"`python src/dashboard.py ckpt_path=<that SAE>` and pass its run folder")


def comparison_html(result: dict, names: list[str], links: list[str | None] | None = None,
                    max_rows: int = 500) -> str:
    """A static page per pair: the smaller SAE's features (most split first), each with its neighbours. With
    ``links`` (one feature browser's ``index.html`` per SAE, relative to the page, or None), every feature id
    opens that feature's page in its SAE's browser."""
    esc = html.escape
    links = links or [None] * len(names)

    def fid(sae: int, f: int) -> str:
        href = links[sae]
        return f"<a href='{esc(href)}#features/{f}'>#{f}</a>" if href else f"#{f}"

    parts = ["<!doctype html><meta charset='utf-8'><title>monosemantic: compare</title>",
             "<style>body{font:13px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}"
             "td,th{border-bottom:1px solid #ddd;padding:2px 8px;vertical-align:top}th{text-align:left}"
             "code{background:#f4f4f4}</style>", "<h1>Matched features</h1>",
             f"<p>{result['n_tokens']:,} tokens; features that fired ≥ {result['min_fires']} times.</p>",
             "<img src='compare.png' style='max-width:100%'>"]
    for pair in result["pairs"]:
        a, b = names[pair["a"]], names[pair["b"]]
        rows = sorted(pair["features"], key=lambda r: (-r.get("children", 0), -r["by_correlation"][0][1]))
        parts.append(f"<h2>{esc(a)} → {esc(b)}</h2>")
        cells = ["feature", "label", "fires"] + (["split into", "by decoder cosine"] if pair["same_transformer"]
                                                  else []) + ["by activation correlation"]
        parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
        for r in rows[:max_rows]:
            def nb(items, sae=pair["b"]):
                return "<br>".join(f"{fid(sae, g)} <b>{v:.3f}</b> <code>{esc(lab)}</code>" for g, v, lab in items)
            tds = [fid(pair["a"], r["feature"]), f"<code>{esc(r['label'])}</code>", str(r["fires"])]
            if pair["same_transformer"]:
                tds += [str(r["children"]), nb(r["by_cosine"])]
            tds.append(nb(r["by_correlation"]))
            parts.append("<tr>" + "".join(f"<td>{t}</td>" for t in tds) + "</tr>")
        parts.append("</table>")
        if len(rows) > max_rows:
            parts.append(f"<p>… {len(rows) - max_rows} more in compare.json</p>")
    return "\n".join(parts)
