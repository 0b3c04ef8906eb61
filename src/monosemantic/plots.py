"""Pictures of SAE metrics: the log10 feature-density histogram (the paper's bimodal view), and the feature
browser's unit densities and proxy distributions.

Figures are built on an Agg canvas without pyplot, so they work headless and leak no global figure state.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monosemantic.metrics import LOG10_FLOOR


def density_histogram_figure(log10_density: torch.Tensor, title: str = "feature density") -> Figure:
    """Histogram of log10 feature density, bins from -10 to 0 (never-fired features sit at -10).

    Built on an Agg canvas without pyplot, so it works headless and leaks no global figure state.
    """
    fig = Figure(figsize=(6, 3.5), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = log10_density.detach().to(torch.float64).cpu().numpy()
    ax.hist(values, bins=50, range=(LOG10_FLOOR, 0.0), color="tab:blue")
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("features")
    ax.set_title(title)
    return fig


def save_density_histogram(log10_density: torch.Tensor, path: str | Path,
                           title: str = "feature density") -> Path:
    """Write the density histogram as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    density_histogram_figure(log10_density, title).savefig(path, format="png", dpi=100)
    return path




def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def unit_density_figure(densities: dict[str, torch.Tensor], n_tokens: int) -> Figure:
    """log10 firing density of each unit set (features, neurons) on the dashboard's text, one panel each;
    units that never fired are drawn at the floor 1/n_tokens / 10."""
    floor = math.log10(1.0 / max(n_tokens, 1)) - 1
    fig = Figure(figsize=(6.5, 2.4 * len(densities)), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (name, d) in enumerate(densities.items()):
        ax = fig.add_subplot(len(densities), 1, i + 1)
        v = torch.log10(d.double().clamp_min(10**floor)).numpy()
        ax.hist(v, bins=60, range=(floor, 0.0), color="tab:blue" if i == 0 else "tab:gray")
        dead = int((d == 0).sum())
        ax.set_title(f"{name}: log10 density over {n_tokens:,} tokens ({dead} never fired, drawn at {floor:.0f})",
                     fontsize=9)
        ax.set_ylabel(name)
    ax.set_xlabel("log10 density")
    return fig


def proxy_distribution_figure(values: dict[str, dict[str, torch.Tensor]], proxies: tuple[str, ...]) -> Figure:
    """Per proxy, the distribution over eligible units of each unit set (features, neurons, control),
    as overlaid step histograms with the medians marked."""
    fig = Figure(figsize=(4.2 * len(proxies), 3.2), tight_layout=True)
    FigureCanvasAgg(fig)
    colors = {"features": "tab:blue", "neurons": "tab:orange", "control": "tab:gray"}
    for j, proxy in enumerate(proxies):
        ax = fig.add_subplot(1, len(proxies), j + 1)
        for name, vals in values.items():
            v = vals[proxy][~vals[proxy].isnan()].numpy()
            if not len(v):
                continue
            c = colors.get(name)
            ax.hist(v, bins=40, range=(0, 1), density=True, histtype="step", lw=1.5, color=c,
                    label=f"{name} (n={len(v)})")
            ax.axvline(float(torch.tensor(v).median()), color=c, ls="--", lw=1)
        ax.set_title(proxy.replace("_", " "), fontsize=10)
        ax.set_xlabel("score (dashed: median)")
        ax.legend(fontsize=7)
    return fig
