"""k SAEs from one activation stream (``SAESweepModule``, ``experiment=sae_sweep``) against k separate runs.

For each k, in one process on the same shards: (a) one Lightning fit of a k-SAE sweep; (b) k fits of one SAE
each, back to back. Both are the real training path (``ActivationDataModule`` streaming shards, Lightning,
dead counters, decoder hygiene; no validation, no logging); each SAE differs in λ only, so each pair trains
the same SAEs. Reported per k: wall seconds for all k SAEs (after the first ``--warmup`` steps of each fit),
the process's CPU seconds, tokens/s per SAE, and separate/sweep (>1: the sweep is faster). Medians over
``--repeats``; each repeat runs (a) then (b).

    python bench/bench_sweep.py --shards data/activations/<set> [--k 1 4 8] [--out bench_sweep.json]
    python bench/bench_sweep.py --quick        # a small synthetic shard set built on the fly
    python bench/bench_sweep.py --shards ... --accelerator gpu --batch 8192   # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.synthetic import random_directions, write_synthetic_shards
from monosemantic.models.sae_module import SAEModule
from monosemantic.models.sae_sweep import SAESweepModule


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.wall.append(time.perf_counter())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu.append(ru.ru_utime + ru.ru_stime)


def _sae(dm: ActivationDataModule, d_sae: int, l1: float) -> SAEModule:
    m = SAEModule(d_sae=d_sae, l1_coeff=l1, d_in=dm.d_in, optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                  l1_warmup_steps=0, b_dec_init_tokens=4096)
    m.attach_data(dm.scale, None, None, "not measured in the benchmark")
    return m


def fit(shards: Path, model_fn, batch: int, steps: int, warmup: int, precision: str,
        accelerator: str = "cpu") -> tuple[float, float]:
    """Wall and CPU seconds of the steps after ``warmup`` of one fit."""
    torch.manual_seed(0)
    dm = ActivationDataModule(shards=str(shards), batch_size=batch, seed=0, lr_windows=0)
    dm.setup("fit")
    model = model_fn(dm)
    timer = StepTimer()
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(model, datamodule=dm)
    return timer.wall[-1] - timer.wall[warmup - 1], timer.cpu[-1] - timer.cpu[warmup - 1]


def sweep_model(lams: list[float], d_sae: int):
    def build(dm: ActivationDataModule) -> SAESweepModule:
        return SAESweepModule([_sae(dm, d_sae, lam) for lam in lams], [f"l1_coeff={lam:g}" for lam in lams])
    return build


def solo_model(lam: float, d_sae: int):
    def build(dm: ActivationDataModule) -> SAEModule:
        return _sae(dm, d_sae, lam)
    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path)
    ap.add_argument("--quick", action="store_true", help="a small synthetic shard set; fewer steps")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--accelerator", default="cpu", help="cpu | gpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory()
        args.shards = write_synthetic_shards(Path(tmp.name), random_directions(256, 64, seed=0), n_tokens=131_072,
                                             p_active=4 / 256, rows_per_sample=1024, samples_per_shard=16)
        args.d_sae, args.batch, args.steps, args.warmup, args.k = 512, 1024, 12, 3, [1, 2]
    if args.shards is None:
        ap.error("--shards or --quick")
    results = []
    for k in args.k:
        lams = [round(3e-3 * 1.5**i, 6) for i in range(k)]
        sweep, separate = [], []
        for _ in range(args.repeats):
            sweep.append(fit(args.shards, sweep_model(lams, args.d_sae), args.batch, args.steps, args.warmup,
                             args.precision, args.accelerator))
            runs = [fit(args.shards, solo_model(lam, args.d_sae), args.batch, args.steps, args.warmup,
                        args.precision, args.accelerator) for lam in lams]
            separate.append((sum(w for w, _ in runs), sum(c for _, c in runs)))
        tokens = (args.steps - args.warmup) * args.batch
        sw, sc = statistics.median(w for w, _ in sweep), statistics.median(c for _, c in sweep)
        pw, pc = statistics.median(w for w, _ in separate), statistics.median(c for _, c in separate)
        row = {"k": k, "d_sae": args.d_sae, "tokens_per_sae": tokens, "sweep_wall_s": round(sw, 2),
               "separate_wall_s": round(pw, 2), "sweep_cpu_s": round(sc, 2), "separate_cpu_s": round(pc, 2),
               "sweep_tokens_per_s_per_sae": round(tokens / sw * k), "separate_tokens_per_s_per_sae":
               round(tokens / pw * k), "separate_over_sweep": round(pw / sw, 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
    header = ("| k | wall, sweep (s) | wall, k runs (s) | CPU s, sweep | CPU s, k runs | tok/s per SAE, sweep | "
              "tok/s per SAE, k runs | k runs / sweep |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(header)
    for r in results:
        print(f"| {r['k']} | {r['sweep_wall_s']:.1f} | {r['separate_wall_s']:.1f} | {r['sweep_cpu_s']:.1f} | "
              f"{r['separate_cpu_s']:.1f} | {r['sweep_tokens_per_s_per_sae']:,} | "
              f"{r['separate_tokens_per_s_per_sae']:,} | {r['separate_over_sweep']:.2f}× |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
