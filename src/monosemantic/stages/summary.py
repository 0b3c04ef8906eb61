"""The end-of-run summary: held-out metrics, then each stage the run needed and whether it was built or reused
(from the artifact store's ledger, not from timing)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from monosemantic.stages.artifacts import Record

ROWS = [("architecture", "architecture", "{}"), ("k", "k", "{}"), ("λ (at the end)", "l1_coeff", "{:.4g}"),
        ("target L0", "target_l0", "{:g}"), ("L0", "l0", "{:.2f}"),
        ("explained variance", "explained_variance", "{:.4f}"),
        ("loss recovered", "loss_recovered", "{:.4f}"), ("CE clean / SAE / ablated", None, None),
        ("KL(clean‖SAE)", "kl", "{:.4f}"), ("MSE (raw activations)", "mse", "{:.5f}"),
        ("dead (held-out)", "dead_frac", "{:.2%}"), ("dense > 1e-2 (held-out)", "dense_frac", "{:.2%}"),
        ("ultralow < 1e-6 (held-out)", "ultralow_frac", "{:.2%}"),
        ("dead (training, last dead window)", "train_dead_frac", "{:.2%}"),
        ("dense > 1e-2 (training window)", "train_dense_frac", "{:.2%}"),
        ("ultralow < 1e-6 (training window)", "train_ultralow_frac", "{:.2%}"),
        ("ground truth: MMCS", "mmcs", "{:.4f}"), ("ground truth: recovered > 0.9", "recovered", "{:.2%}"),
        ("held-out tokens", "n_tokens", "{:,.0f}"), ("loss-recovered tokens", "lr_tokens", "{:,.0f}"),
        ("training density window (tokens)", "train_density_window_tokens", "{:,}"),
        ("training tokens", "training_tokens", "{:,}")]


def _ledger_rows(table: Table, ledger: list[Record]) -> None:
    for r in ledger:
        how = f"built in {r.seconds:.0f} s" if r.status == "built" else (
            f"reused (waited {r.waited_s:.0f} s for another process's build)" if r.waited_s else "reused")
        table.add_row(f"{r.stage}", how)


def print_ledger(ledger: list[Record]) -> None:
    table = Table(title="stages", show_header=True)
    table.add_column("stage")
    table.add_column("built or reused", justify="right")
    _ledger_rows(table, ledger)
    console = Console()
    console.print(table)
    for r in ledger:
        console.print(f"{r.stage}: {r.path}")


def print_summary(metrics: dict, ledger: list[Record], timings: dict[str, float], export_dir: Path,
                  metrics_path: Path, title: str = "SAE") -> None:
    table = Table(title=f"{title} — held-out metrics", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, fmt in ROWS:
        if key is None:
            if "ce_clean" in metrics:
                table.add_row(label, f"{metrics['ce_clean']:.4f} / {metrics['ce_sae']:.4f} / "
                                     f"{metrics['ce_ablated']:.4f}")
        elif metrics.get(key) is not None:
            table.add_row(label, fmt.format(metrics[key]))
    if "loss_recovered_skipped" in metrics:
        table.add_row("loss recovered", f"not measured: {metrics['loss_recovered_skipped']}")
    _ledger_rows(table, ledger)
    for stage, seconds in timings.items():
        table.add_row(f"time: {stage}", f"{seconds:.0f} s")
    console = Console()
    console.print(table)
    console.print(f"export:  {export_dir}\nmetrics: {metrics_path}")


# one row per SAE of a sweep or per run of a multirun: what the frontier plots, side by side
SWEEP_COLUMNS = [("SAE", "name", "{}"), ("arch.", "architecture", "{}"), ("k", "k", "{}"),
                 ("d_sae", "d_sae", "{:,}"), ("λ", "l1_coeff", "{:g}"), ("lr", "lr", "{:g}"),
                 ("L0", "l0", "{:.2f}"), ("explained var.", "explained_variance", "{:.4f}"),
                 ("loss recovered", "loss_recovered", "{:.4f}"), ("dead", "dead_frac", "{:.2%}"),
                 ("dense > 1e-2", "dense_frac", "{:.2%}"), ("MMCS", "mmcs", "{:.4f}"),
                 ("recovered", "recovered", "{:.2%}"), ("metrics", "metrics", "{}")]


def sweep_row(name: str, final: dict, metrics_path: Path | str) -> dict:
    """One SAE's row: its settings and held-out metrics (``metrics.json``'s keys), and where they are."""
    row: dict = {"name": name, "metrics": str(metrics_path)}
    row.update({key: final[key] for _, key, _ in SWEEP_COLUMNS if key in final and key not in row})
    return row


def format_sweep_table(rows: list[dict], title: str) -> tuple[Table, str]:
    """The rows as a rich table (terminal) and as Markdown (``sweep.md``), missing values as ``–``."""
    cols = [(label, key, fmt) for label, key, fmt in SWEEP_COLUMNS if any(key in r for r in rows)]
    table = Table(title=title, show_header=True)
    for label, _, _ in cols:
        table.add_column(label, justify="left" if label in ("SAE", "metrics") else "right")
    lines = [f"# {title}", "", "| " + " | ".join(label for label, _, _ in cols) + " |",
             "|" + "|".join("---" if label in ("SAE", "metrics") else "---:" for label, _, _ in cols) + "|"]
    for r in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "–" for _, key, fmt in cols]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    return table, "\n".join(lines) + "\n"


def print_sweep_table(rows: list[dict], path: Path, title: str = "sweep — held-out metrics per SAE") -> None:
    """Print the sweep's table and write it beside the run: ``<path>`` (Markdown) and ``<path>.json`` (rows)."""
    table, md = format_sweep_table(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md)
    path.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    console = Console()
    console.print(table)
    console.print(f"sweep table: {path}")
