"""Our recipe against SAELens's standard SAE on the L0–loss-recovered frontier, trained side by side.

    python bench/bench_saelens.py --shards data/activations/<demo set>                 # both, 3 λ each
    python bench/bench_saelens.py --shards ... --steps 850 --ours-extra model.target_l0=20

SAELens runs in its own environment (``make interop-env``, ``.venv-interop``): the script starts itself there
with ``--saelens-worker``. That worker trains ``StandardTrainingSAE`` (SAELens 6 defaults: L1 weighted by the
decoder norms, decoder rows starting at norm 0.1, b_dec applied to the input, no resampling) through SAELens's
own ``SAETrainer`` (Adam lr 3e-4, constant, no warm-up, as its runner's defaults), fed our training stream of
the same shards: the same normalised activations (mean norm √d_in), batch 4,096. Its learning rate is
constant, so its state after N steps *is* an N-step run: one run per λ is saved at every budget in ``--steps``.
Ours: ``src/train.py experiment=<--ours> model.l1_coeff=λ scale.sae.max_steps=N`` for each λ and N (our LR
decays over the last 20%, so each budget is its own run). Every SAE is then scored by ``src/eval.py`` on the
same held-out shard and the same loss-recovered windows. λ is in each library's own units (SAELens sums the
squared error over dimensions, we average it: λ_SAELens ≈ d_in·λ_ours).

Run again with the same ``--out``, it keeps the runs and scores that finished and does the rest.
Writes ``frontier.md``, ``frontier.json`` and ``frontier.png`` (L0, log axis, against loss recovered; one
panel per budget) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTEROP_PYTHON = ROOT / ".venv-interop" / "bin" / "python"


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}); see {log}:\n" + "".join(open(log).readlines()[-25:]))


# ---- SAELens, in its own environment ------------------------------------------------------------------------
def saelens_worker(a: argparse.Namespace) -> None:
    """Train SAELens's standard SAE at one λ; save an SAELens export (raw space) after each of ``a.steps``."""
    import torch
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from monosemantic.data.activation_datamodule import ActivationDataModule

    torch.manual_seed(a.seed)
    dm = ActivationDataModule(shards=a.shards, batch_size=a.batch_size, val_shards=1, seed=a.seed)
    dm.setup("fit")
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=dm.d_in, d_sae=a.d_sae, l1_coefficient=a.l1,
                                                        dtype="float32", device="cpu"))
    budgets = sorted(a.steps)
    out = Path(a.out)

    def save(step: int) -> None:
        # the SAE saw normalised activations s·x: fold s in, so the export reads raw activations as ours do
        state = {k: v.clone() for k, v in sae.state_dict().items()}
        sae.fold_activation_norm_scaling_factor(dm.scale)
        sae.save_inference_model(out / f"steps_{step}")
        sae.load_state_dict(state)
        # silent over the last 8% of the steps so far, our runs' dead window (demo_schedule), from the trainer's
        # own count of steps since each feature fired
        window = round(0.08 * step)
        silent = float((trainer.n_forward_passes_since_fired >= window).float().mean()) if window else None
        (out / f"steps_{step}" / "silent.json").write_text(json.dumps(
            {"train_dead_frac": silent, "dead_window_tokens": window * a.batch_size}))
        print(f"saved SAELens λ={a.l1} after {step} steps", flush=True)

    def provider():
        stream = iter(dm.stream("train"))  # infinite: passes re-ordered as our runs' are
        for step in range(budgets[-1]):
            if step in budgets:  # asked for batch step+1 only after `step` optimizer steps
                save(step)
            yield next(stream).float()

    cfg = SAETrainerConfig(total_training_samples=budgets[-1] * a.batch_size, train_batch_size_samples=a.batch_size,
                           lr=3e-4, lr_end=3e-5, device="cpu")  # LanguageModelSAERunnerConfig's defaults
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    trainer.fit()  # stops after the last budget's steps
    save(budgets[-1])


# ---- the driver ---------------------------------------------------------------------------------------------
def evaluate(export: Path, shards: str, lr_windows: int, log: Path) -> dict:
    out = export / f"bench_eval_{lr_windows}.json"
    if not out.exists():  # scored before by an interrupted call with the same --out: kept
        run([sys.executable, "src/eval.py", f"ckpt_path={export}", f"shards={shards}", "val_shards=1",
             f"lr_windows={lr_windows}", f"output={out}"], log)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[850, 1700], help="budgets, in steps of 4,096")
    ap.add_argument("--ours", default="sae_4096", help="our experiment")
    ap.add_argument("--ours-l1", type=float, nargs="*", default=[3e-3, 6e-3, 1.2e-2])
    ap.add_argument("--ours-target-l0", type=float, nargs="*", default=[],
                    help="sweep model.target_l0 instead of λ (each run reports the λ it found)")
    ap.add_argument("--ours-extra", nargs="*", default=[], help="more overrides for our runs")
    ap.add_argument("--ours-resample", type=float, nargs="+", default=[0.2, 0.35, 0.5],
                    help="our resampling steps, as fractions of each run")
    ap.add_argument("--saelens-l1", type=float, nargs="*", default=[3.0, 6.0, 12.0])
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr-windows", type=int, default=512, help="held-out windows for loss recovered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--saelens-python", type=Path, default=INTEROP_PYTHON)
    ap.add_argument("--saelens-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--l1", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.saelens_worker:
        return saelens_worker(a)
    if a.saelens_l1 and not a.saelens_python.exists():
        sys.exit(f"{a.saelens_python} does not exist: run `make interop-env` (SAELens's own environment)")
    out = a.out or ROOT / "logs" / "bench_saelens" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def add(lib: str, l1: float, steps: int, export: Path, train_s: float, **extra) -> None:
        slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", lib).strip("_")
        m = evaluate(export, a.shards, a.lr_windows, out / f"eval_{slug}_{l1:g}_{steps}.log")
        rows.append({"library": lib, "l1_coeff": l1, "steps": steps, "tokens": steps * a.batch_size,
                     "export": str(export), "train_s": train_s, **extra,
                     **{k: m.get(k) for k in ("l0", "loss_recovered", "explained_variance", "dead_frac", "mse",
                                              "n_tokens")}})
        print(json.dumps(rows[-1]), flush=True)
        write(out, rows, a)

    # ours: a λ sweep, or (--ours-target-l0) a sweep of target L0s, each finding its own λ
    knobs = [("target_l0", t) for t in a.ours_target_l0] or [("l1_coeff", v) for v in a.ours_l1]
    for knob, value in knobs:
        # the run's name carries what sets it apart, so a rerun with other overrides in the same --out trains anew
        variant = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join([  # no '=': Hydra's run dir override would not parse
            *a.ours_extra, *([f"resample-{'-'.join(f'{f:g}' for f in a.ours_resample)}"]
                             if a.ours_resample != [0.2, 0.35, 0.5] else []),
            *[f"{k}-{v}" for k, v, default in (("d_sae", a.d_sae, 4096), ("batch", a.batch_size, 4096),
                                               ("seed", a.seed, 0)) if v != default]])).strip("_")
        for steps in a.steps:
            run_dir = out / "ours" / "_".join(filter(None, [a.ours, variant, f"{knob}_{value:g}_steps_{steps}"]))
            t0 = time.time()
            if (run_dir / "metrics.json").exists():  # a finished run of an earlier, interrupted call: kept
                print(f"kept {run_dir} (finished before)", flush=True)
            else:
                run([sys.executable, "src/train.py", f"experiment={a.ours}", f"data.shards={a.shards}", "logger=csv",
                     f"hydra.run.dir={run_dir}", f"model.{knob}={value}", f"model.d_sae={a.d_sae}",
                     f"scale.sae.batch_size={a.batch_size}", f"seed={a.seed}",
                     *demo_schedule(steps, a.batch_size, tuple(a.ours_resample)), *a.ours_extra],
                    out / f"train_{run_dir.name}.log")
            final = json.loads((run_dir / "metrics.json").read_text())
            train_s = final.get("timings_s", {}).get("train SAE", time.time() - t0)
            fracs = "/".join(f"{f:.0%}" for f in a.ours_resample)
            label = " ".join([a.ours, *(["model.target_l0=<L0>"] if knob == "target_l0" else []), *a.ours_extra,
                              *([f"resampling at {fracs}"] if a.ours_resample != [0.2, 0.35, 0.5] else [])])
            add(f"ours ({label})", final["l1_coeff"], steps, run_dir / "export", train_s, **{knob: value},
                train_dead_frac=final.get("train_dead_frac"), dead_window_tokens=final.get("dead_window_tokens"))

    for l1 in a.saelens_l1:
        wdir = out / "saelens" / f"l1_{l1:g}"
        t0 = time.time()
        timing = wdir / "train_s.json"
        if all((wdir / f"steps_{n}" / "cfg.json").exists() for n in a.steps) and timing.exists():
            print(f"kept {wdir} (finished before)", flush=True)
        else:
            run([str(a.saelens_python), __file__, "--saelens-worker", "--shards", a.shards, "--l1", str(l1),
                 "--steps", *map(str, a.steps), "--d-sae", str(a.d_sae), "--batch-size", str(a.batch_size),
                 "--seed", str(a.seed), "--out", str(wdir)], out / f"train_saelens_{l1:g}.log")
            timing.write_text(json.dumps({"train_s": time.time() - t0}))
        for steps in a.steps:
            silent = wdir / f"steps_{steps}" / "silent.json"
            add("SAELens standard", l1, steps, wdir / f"steps_{steps}", json.loads(timing.read_text())["train_s"],
                **(json.loads(silent.read_text()) if silent.exists() else {}))


def demo_schedule(steps: int, batch_size: int, resample_fracs: tuple[float, ...] = (0.2, 0.35, 0.5)) -> list[str]:
    """The demo scale's schedule at another length, in the same fractions of the run: resampling at 20/35/50%
    (``resample_fracs``), λ warm-up 5%, dead window 8%, validation every 25% (at 1,700 steps: exactly
    configs/scale/demo.yaml)."""
    resample = ",".join(str(round(steps * f)) for f in resample_fracs)
    return [f"scale.sae.max_steps={steps}", f"scale.sae.resample_steps=[{resample}]",
            f"scale.sae.l1_warmup_steps={round(0.05 * steps)}",
            f"scale.sae.dead_window_tokens={round(0.08 * steps) * batch_size}",
            f"scale.sae.val_check_interval={max(1, steps // 4)}"]


def write(out: Path, rows: list[dict], a: argparse.Namespace) -> None:
    (out / "frontier.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows},
                                                  indent=1))
    # dead: silent on the held-out shard; silent in training: over the last dead window of training tokens (ours:
    # the run's own counter; SAELens: its trainer's steps since each feature fired), which tells rare from dead
    lines = ["| library | target L0 | λ | steps (tokens) | L0 | loss recovered | explained var. | dead (held out) | "
             "silent in training | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["steps"], r["library"], r["l1_coeff"])):
        silent = (f"{r['train_dead_frac']:.1%} of {r['dead_window_tokens'] / 1e3:,.0f}k"
                  if r.get("train_dead_frac") is not None else "–")
        lines.append(f"| {r['library']} | {r.get('target_l0', '–')} | {r['l1_coeff']:.3g} | "
                     f"{r['steps']} ({r['tokens'] / 1e6:.1f}M) | "
                     f"{r['l0']:.1f} | {r['loss_recovered']:.3f} | {r['explained_variance']:.3f} | "
                     f"{r['dead_frac']:.1%} | {silent} | {r['train_s']:.0f} |")
    held_out = sorted({int(r["n_tokens"]) for r in rows if r.get("n_tokens")})
    if held_out:  # a feature rarer than about 1 / this cannot be told from a dead one there
        lines.append(f"\ndead (held out): fired on none of the {', '.join(f'{n:,}' for n in held_out)} held-out tokens")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.2), squeeze=False, sharey=True)
    for ax, steps in zip(axes[0], budgets):
        for lib in sorted({r["library"] for r in rows}):
            pts = sorted((r["l0"], r["loss_recovered"], r["dead_frac"]) for r in rows
                         if r["library"] == lib and r["steps"] == steps)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=lib)
            for x, y, dead in pts:
                ax.annotate(f"{dead:.0%} dead", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held out)")
        ax.set_title(f"{steps} steps × {a.batch_size:,} = {steps * a.batch_size / 1e6:.1f}M activations")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss recovered (held out)")
    axes[0][-1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: no point hidden
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"table: {out / 'frontier.md'}", flush=True)


if __name__ == "__main__":
    main()
