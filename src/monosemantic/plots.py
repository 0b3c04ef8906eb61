"""Pictures of SAE metrics: the log10 feature-density histogram (the paper's bimodal view).

Figures are built on an Agg canvas without pyplot, so they work headless and leak no global figure state.
"""

from __future__ import annotations

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


