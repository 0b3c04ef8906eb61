"""The end-of-run summary table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(metrics: dict, timings: dict[str, float], export_dir: Path, metrics_path: Path) -> None:
    table = Table(title="SAE — held-out metrics", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("L0", "l0", "{:.2f}"), ("explained variance", "explained_variance", "{:.4f}"),
            ("loss recovered", "loss_recovered", "{:.4f}"), ("CE clean / SAE / ablated", None, None),
            ("KL(clean‖SAE)", "kl", "{:.4f}"), ("MSE", "mse", "{:.5f}"),
            ("dead (held-out)", "dead_frac", "{:.2%}"), ("dead (training window)", "train_dead_frac", "{:.2%}"),
            ("dense > 1e-2", "dense_frac", "{:.2%}"), ("ultralow < 1e-6", "ultralow_frac", "{:.2%}"),
            ("held-out tokens", "n_tokens", "{:,.0f}"), ("training tokens", "training_tokens", "{:,}")]
    for label, key, fmt in rows:
        if key is None:
            if "ce_clean" in metrics:
                table.add_row(label, f"{metrics['ce_clean']:.4f} / {metrics['ce_sae']:.4f} / "
                                     f"{metrics['ce_ablated']:.4f}")
        elif key in metrics:
            table.add_row(label, fmt.format(metrics[key]))
    for stage, seconds in timings.items():
        reused = stage in ("tokenize + transformer", "cache activations") and seconds < 2
        table.add_row(f"time: {stage}", "reused" if reused else f"{seconds:.0f} s")
    table.add_row("time: total", f"{sum(timings.values()):.0f} s")
    console = Console()
    console.print(table)
    console.print(f"export:  {export_dir}\nmetrics: {metrics_path}")
