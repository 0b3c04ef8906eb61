"""The SAE variants side by side on one shard set, each through the real entry point, one table.

Each recipe is ``python src/train.py experiment=<variant> data.shards=<set> …`` in its own subprocess, run one
after another (the machine has 2 cores: never two at once); the table collects each run's ``metrics.json``.
The λ-based recipes use ``model.target_l0`` so every variant lands near the same L0 (TopK variants get it from
``k``): a comparison at matched L0, as the field reports SAEs. ``--dashboard`` also runs
``src/dashboard.py`` on each export and adds the interpretability proxies (medians over the features that
fired ≥ 128 times).

    python bench/bench_variants.py --shards data/activations/<demo set> --l0 20           # the demo cache
    python bench/bench_variants.py --shards data/ground_truth/<set> --l0 8 --steps 900    # planted features
    python bench/bench_variants.py --shards ... --only standard topk --extra scale.sae.max_steps=850

Writes ``<out>/variants.md`` and ``variants.json`` (default ``logs/bench_variants/<stamp>``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (experiment, overrides given the target L0)
RECIPES = {
    "standard (paper, λ fixed)": ("sae_4096", lambda l0: []),
    "standard + target_l0": ("sae_4096", lambda l0: [f"model.target_l0={l0}"]),
    "april (no pre-bias, ‖d‖-weighted L1) + target_l0": ("sae_april", lambda l0: [f"model.target_l0={l0}"]),
    "topk + AuxK": ("sae_topk", lambda l0: [f"model.k={int(round(l0))}"]),
    "batchtopk + AuxK": ("sae_batchtopk", lambda l0: [f"model.k={int(round(l0))}"]),
    "matryoshka batchtopk + AuxK": ("sae_matryoshka", lambda l0: [f"model.k={int(round(l0))}"]),
    "jumprelu + target_l0": ("sae_jumprelu", lambda l0: [f"model.target_l0={l0}"]),
}
SHORT = {"standard": "standard (paper, λ fixed)", "standard_target": "standard + target_l0",
         "april": "april (no pre-bias, ‖d‖-weighted L1) + target_l0", "topk": "topk + AuxK",
         "batchtopk": "batchtopk + AuxK", "matryoshka": "matryoshka batchtopk + AuxK",
         "jumprelu": "jumprelu + target_l0"}
COLUMNS = [("recipe", "recipe", "{}"), ("L0", "l0", "{:.1f}"), ("loss recovered", "loss_recovered", "{:.3f}"),
           ("explained var.", "explained_variance", "{:.3f}"), ("dead", "dead_frac", "{:.1%}"),
           ("dense > 1e-2", "dense_frac", "{:.1%}"), ("MMCS", "mmcs", "{:.3f}"),
           ("recovered > 0.9", "recovered", "{:.1%}"), ("λ at the end", "l1_coeff", "{:.3g}"),
           ("token spec.", "token_specificity", "{:.3f}"), ("context cons.", "context_consistency", "{:.3f}"),
           ("logit coh.", "logit_coherence", "{:.3f}"), ("train s", "train_s", "{:.0f}")]


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{cmd[1]} failed (exit {proc.returncode}); the end of {log}:\n{tail}")


def proxies(dashboard_json: Path) -> dict:
    """The features' proxy medians (over those that fired ≥ n_sample times) from ``dashboard.json``."""
    summary = json.loads(dashboard_json.read_text())["proxy_summary"]["features"]
    return {k: summary[f"{k}_median"] for k in ("token_specificity", "context_consistency", "logit_coherence")
            if summary.get(f"{k}_median") is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="the shard set every recipe trains on")
    ap.add_argument("--l0", type=float, default=20.0, help="the L0 every recipe aims at (TopK: k)")
    ap.add_argument("--steps", type=int, default=None, help="scale.sae.max_steps for every recipe")
    ap.add_argument("--only", nargs="*", default=None, help=f"a subset of {sorted(SHORT)}")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    ap.add_argument("--dashboard", action="store_true", help="also run src/dashboard.py on each export")
    ap.add_argument("--dashboard-tokens", type=int, default=262_144)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or ROOT / "logs" / "bench_variants" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    names = [SHORT[n] for n in a.only] if a.only else list(RECIPES)
    rows = []
    for name in names:
        experiment, overrides = RECIPES[name]
        run_dir = out / experiment / str(len(rows))
        cmd = [sys.executable, "src/train.py", f"experiment={experiment}", f"data.shards={a.shards}", "logger=csv",
               f"hydra.run.dir={run_dir}", *overrides(a.l0),
               *([f"scale.sae.max_steps={a.steps}"] if a.steps else []), *a.extra]
        t0 = time.time()
        run(cmd, out / f"{len(rows)}_train.log")
        final = json.loads((run_dir / "metrics.json").read_text())
        row = {"recipe": name, "experiment": experiment, "overrides": cmd[3:], "run": str(run_dir),
               "train_s": time.time() - t0, **{k: final.get(k) for _, k, _ in COLUMNS if k in final}}
        if a.dashboard:
            dash = out / f"dashboard_{len(rows)}"
            run([sys.executable, "src/dashboard.py", f"ckpt_path={run_dir / 'export'}", f"hydra.run.dir={dash}",
                 f"n_tokens={a.dashboard_tokens}", "progress=false"], out / f"{len(rows)}_dashboard.log")
            row.update(proxies(dash / "dashboard.json"))
        rows.append(row)
        print({k: row.get(k) for _, k, _ in COLUMNS}, flush=True)
        write(out, rows, a)


def write(out: Path, rows: list[dict], a: argparse.Namespace) -> None:
    cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    lines = [f"# SAE variants on {a.shards} (target L0 {a.l0:g})", "",
             "| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---" if c[0] == "recipe" else "---:"
                                                                         for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "–" for _, k, fmt in cols)
                     + " |")
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    (out / "variants.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"table: {out / 'variants.md'}", flush=True)


if __name__ == "__main__":
    main()
