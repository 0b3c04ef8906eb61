"""The sparsity–fidelity frontier: every SAE a set of runs trained, L0 against loss recovered and explained
variance (the paper's and SAEBench's view of a λ sweep).

:func:`collect` finds the SAEs: each ``metrics.json`` with an ``l0`` below the given folders (a run, a
multirun's sweep folder, an in-process sweep's ``saes/<name>``), or the files themselves. :func:`frontier_figure`
draws them, one line per dictionary size, each point labelled by its λ.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monosemantic.errors import InputError, MissingInputError
from monosemantic.stages.summary import sweep_row

log = logging.getLogger(__name__)

PANELS = (("loss_recovered", "loss recovered"), ("explained_variance", "explained variance"))


def _name(path: Path, roots: list[Path]) -> str:
    """A point's name: its folder relative to the root it was found under (``saes/l1_coeff=0.003,…``)."""
    for root in roots:
        if path.is_relative_to(root) and path.parent != root:
            return str(path.parent.relative_to(root))
    return path.parent.name


def collect(paths: Iterable[str | Path]) -> list[dict]:
    """One row (:func:`~monosemantic.stages.summary.sweep_row`) per SAE's ``metrics.json`` under ``paths``,
    in path order. A path that does not exist, or holds no SAE metrics, is an error naming it."""
    roots = [Path(p) for p in paths]
    rows: list[dict] = []
    for root in roots:
        if not root.exists():
            raise MissingInputError(f"runs: {root} does not exist")
        files = [root] if root.is_file() else sorted(root.rglob("metrics.json"))
        found = 0
        for f in files:
            try:
                final = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"{f}: not JSON ({e})") from e
            if not isinstance(final, dict) or "l0" not in final:  # e.g. a transformer run's
                continue
            rows.append(sweep_row(_name(f, roots), final, f))
            found += 1
        if not found:
            raise MissingInputError(f"runs: no SAE metrics.json (with an l0) under {root}")
    return rows


def frontier_figure(rows: list[dict], title: str = "sparsity vs fidelity") -> Figure:
    """L0 (log x) against loss recovered and against explained variance; a line per ``d_sae``, sorted by L0,
    each point labelled with its λ. A panel whose metric no row has says so instead of plotting nothing."""
    fig = Figure(figsize=(11, 4.2), tight_layout=True)
    FigureCanvasAgg(fig)
    # one line per (architecture, d_sae): a TopK and a ReLU SAE of one size are two recipes, not one curve
    sizes = sorted({(r.get("architecture") or "standard", r.get("d_sae")) for r in rows},
                   key=lambda a_d: (a_d[0], a_d[1] is None, a_d[1] or 0))
    colors = dict(zip(sizes, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                              "tab:pink", "tab:gray", "tab:olive", "tab:cyan") * 4))
    for i, (key, label) in enumerate(PANELS):
        ax = fig.add_subplot(1, len(PANELS), i + 1)
        have = [r for r in rows if r.get(key) is not None and r.get("l0", 0) > 0]
        for d in sizes:
            pts = sorted((r for r in have if ((r.get("architecture") or "standard"), r.get("d_sae")) == d),
                         key=lambda r: r["l0"])
            if not pts:
                continue
            arch = "" if {a for a, _ in sizes} == {"standard"} else f"{d[0]} "
            ax.plot([r["l0"] for r in pts], [r[key] for r in pts], "o-", color=colors[d],
                    label=f"{arch}d_sae={d[1]:,}" if d[1] is not None else f"{arch}d_sae=?")
            for r in pts:
                lam = r.get("l1_coeff")
                ax.annotate(f"λ={lam:g}" if lam is not None else r["name"], (r["l0"], r[key]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.1)  # room for the labels of the outermost points
        ax.set_xlabel("L0 (features active per token, held out)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if have:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no run measured {label}", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(f"{title} ({len(rows)} SAEs)")
    return fig


def latest_sweep(log_dir: str | Path) -> Path:
    """The newest sweep under ``logs/``: a multirun's folder (``multiruns/<stamp>``) or an in-process sweep's
    run (``sae_sweep/runs/<stamp>``, any task whose run has a ``saes/`` folder)."""
    root = Path(log_dir)
    found = [p for p in root.glob("multiruns/*") if p.is_dir()] + [p.parent for p in root.glob("*/runs/*/saes")]
    if not found:
        raise MissingInputError(f"runs=[]: no sweep under {root} (no multiruns/<stamp>, no <task>/runs/<stamp>/saes);"
                                " pass runs=[<folder or metrics.json>, ...]")
    return max(found, key=lambda p: p.stat().st_mtime)


def run(cfg) -> dict:
    """``python src/frontier.py runs=[...]``: the frontier PNG and its table (``frontier.md``/``.json``) in the
    run folder, and, with ``wandb=true``, both in a W&B run (offline without credentials)."""
    from monosemantic.plots import figure_png
    from monosemantic.stages.summary import print_sweep_table

    runs = list(cfg.runs) if cfg.get("runs") else [latest_sweep(cfg.paths.log_dir)]
    rows = collect(runs)
    out = Path(cfg.paths.output_dir)
    png = Path(cfg.out) if cfg.get("out") else out / "frontier.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig = frontier_figure(rows, title=cfg.get("title") or "sparsity vs fidelity")
    png.write_bytes(figure_png(fig, dpi=int(cfg.get("dpi", 120))))
    print_sweep_table(rows, out / "frontier.md", title=f"frontier: {', '.join(str(r) for r in runs)}")
    log.info("frontier of %d SAEs: %s", len(rows), png)
    if cfg.get("wandb"):
        import wandb

        from monosemantic.utils.hydra_utils import wandb_offline

        cols = sorted({k for r in rows for k in r})
        run_ = wandb.init(project=cfg.get("wandb_project", "monosemantic"), name=f"frontier/{out.name}",
                          group="frontier", job_type="frontier", dir=str(out), reinit="create_new",
                          mode="offline" if wandb_offline() else "online", config={"runs": [str(r) for r in runs]})
        run_.log({"frontier": wandb.Image(str(png)),
                  "frontier_table": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        run_.finish()
    return {"n_saes": len(rows), "png": str(png), "rows": rows}
