"""``make bench``: one table of how fast the SAE trains on this machine, and in how much memory, from one run.

Each part runs in a subprocess of its own, so its peak RSS (``VmHWM``) is its own; parts run one after
another, never side by side (a shared 2-core machine is noisy enough). Rows:

- **bounds**: the machine's matmul rate for the encoder's shape ([batch, d_in] × [d_in, d_sae], fp32 and bf16)
  turned into tokens/s: dense ``rate / (12·d_in·d_sae)`` (forward 4 + backward 8 FLOPs per weight per token),
  sparse ``rate / (2·d_in·d_sae)`` (the encoder forward alone, the only dense product of the sparse step).
- **step** at each d_sae, from a fresh init (L0 ≈ d_sae/2: the dense path) and from a trained one: the full
  Lightning path (``SAEModule`` + ``ActivationDataModule`` + ``Trainer``, fp32 and bf16-mixed), the same math in
  a minimal hand-written loop (the measured dense/sparse rule, fp32), and a dense fp32 hand-written loop (the
  reference every speed-up is quoted against). Medians of per-step times. The trained init at 4,096 is a demo
  SAE export; at larger sizes that export tiled (each feature copied d_sae/4,096 times, with noise), which has
  a trained SAE's sparsity (its L0 is in the table) but is not a trained SAE of that size.
- **stage**: the whole demo SAE stage, ``src/train.py experiment=sae_4096`` on the demo cache (validation,
  resampling, checkpoints included): training tokens ÷ the stage's "train SAE" time, its peak RSS, and RSS
  sampled through the run. ``--long``: the same run 4× longer (4 passes), for memory. ``--stage-sizes``
  (32,768): the same recipe at those sizes, a quarter of the run (425 steps, its schedule scaled).
- **reference**: the same stage cut to a quarter (425 steps, its schedule scaled), as shipped (bf16-mixed,
  measured sparse rule) and as the dense fp32 reference (``model.sparse_step=false scale.sae.precision=32-true``),
  same data and seed: the final metrics side by side.
- **pipeline**: caching vs a bare forward, streamed shards vs in-memory batches (``bench_activations.py``), and
  on-the-fly / cached activations/s vs the SAE step (``bench_onthefly.py``), on the demo transformer.
- **compile**: ``torch.compile`` of the loss forward+backward against eager, on the dense path (fresh init) and
  on the sparse step (trained init), fp32, with its compile time: whether it pays here.
- **saelens**: SAELens's own training step (``StandardTrainingSAE`` through its ``SAETrainer._train_step``: its
  forward, L1 by decoder norm, backward, grad clipping, Adam) at each d_sae, in ``.venv-interop``
  (``make interop-env``); skipped with a note when that environment is absent.

    make bench                                   # everything: ~65 min on 2 CPU cores; writes bench/results/
    python bench/bench_table.py --quick          # tiny sizes, every part, a few minutes: a check of the script
    python bench/bench_table.py --parts step,bounds --sizes 4096

Needs the demo cache and transformer (``make train``, or ``--shards``/``--model-dir``) and a demo SAE export
(``--init``) for the trained rows; ``--quick`` builds tiny ones of each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_saelens import INTEROP_PYTHON  # noqa: E402  (SAELens's own environment)

PARTS = ("bounds", "step", "compile", "saelens", "stage", "reference", "pipeline")
QUARTER = ["scale.sae.max_steps=425", "scale.sae.resample_steps=[85,149,212]", "scale.sae.l1_warmup_steps=21",
           "scale.sae.dead_window_tokens=139264", "scale.sae.val_check_interval=425"]
REFERENCE = ["model.sparse_step=false", "scale.sae.precision=32-true"]


# ---- running a part: a child process, its peak RSS, RSS sampled while it runs -----------------------------

def _status_mb(pid: int | str, field: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def own_peak_mb() -> float:
    """This process's peak RSS since its ``exec``: ``VmHWM``. (``ru_maxrss`` would not do: Linux carries the
    forking parent's peak into the child across ``exec``.)"""
    return _status_mb("self", "VmHWM") or 0.0


def run_script(out: Path, script: str, argv: list[str]) -> None:
    """Run ``script`` as ``__main__`` with ``argv``, then write its peak RSS to ``out`` (also when it exits)."""
    import atexit
    import runpy

    atexit.register(lambda: out.write_text(json.dumps({"peak_rss_mb": own_peak_mb()})))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def run_child(cmd: list[str], log: Path, sample_s: float = 5.0) -> dict:
    """Run ``cmd`` (stdout+stderr to ``log``): its wall time and its RSS every ``sample_s`` seconds."""
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"})
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(sample_s):
                rss = _status_mb(proc.pid)
                if rss is not None:
                    samples.append((time.perf_counter() - t0, rss))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        stop.set()
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"bench part failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"wall_s": time.perf_counter() - t0, "rss_samples": samples}


def run_part(name: str, args: list[str], work: Path, label: str | None = None, python: Path | None = None) -> dict:
    label = label or name
    out = work / f"{label}.json"
    usage = run_child([str(python or sys.executable), __file__, "--part", name, "--part-out", str(out), *args],
                      work / f"{label}.log")
    return {**json.loads(out.read_text()), **usage}


# ---- the parts (run in the child) ----------------------------------------------------------------------

def trained_init(export: Path, d_sae: int, scale: float) -> dict:
    """A demo export in the normalised space; tiled (with noise) to ``d_sae`` when that is larger, its first
    ``d_sae`` features when smaller."""
    import torch

    from monosemantic.export import load_sae

    sae, _ = load_sae(export)
    state = {k: v * scale if k in ("b_enc", "b_dec") else v for k, v in sae.state_dict().items()}
    if d_sae < sae.d_sae and sae.d_sae % d_sae == 0:  # smaller: the export's first d_sae features
        return {k: v[..., :d_sae] if k in ("W_enc", "b_enc") else v[:d_sae] if k == "W_dec" else v
                for k, v in state.items()}
    reps = d_sae // sae.d_sae
    if reps * sae.d_sae != d_sae:
        raise SystemExit(f"--init has d_sae {sae.d_sae}; {d_sae} is neither a multiple nor a divisor of it")
    if reps > 1:
        g = torch.Generator().manual_seed(0)
        W_dec = state["W_dec"].repeat(reps, 1)
        W_dec = W_dec + 0.05 * torch.randn(W_dec.shape, generator=g) / W_dec.shape[1] ** 0.5
        state["W_dec"] = W_dec / W_dec.norm(dim=1, keepdim=True)
        state["W_enc"] = state["W_enc"].repeat(1, reps) * (1 + 0.05 * torch.randn(1, d_sae, generator=g))
        state["b_enc"] = state["b_enc"].repeat(reps)
    return state


def part_bounds(a) -> dict:
    import torch
    from bench_sae import matmul_gflops

    rows = []
    for d_sae in a.sizes:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            g = statistics.median(matmul_gflops(a.d_in, d_sae, a.batch, dtype) for _ in range(3))
            rows.append({"d_sae": d_sae, "dtype": name, "gflops": g,
                         "dense_bound": g * 1e9 / (12 * a.d_in * d_sae),
                         "sparse_bound": g * 1e9 / (2 * a.d_in * d_sae)})
    return {"rows": rows, "threads": torch.get_num_threads()}


def part_step(a) -> dict:
    import torch
    from bench_sae import hand_tokens_per_s, lightning_tokens_per_s

    from monosemantic.data.activation_datamodule import ActivationDataModule
    from monosemantic.models.components.sae import SparseAutoencoder

    dm = ActivationDataModule(shards=str(a.shards), batch_size=a.batch, lr_windows=0)
    dm.setup()
    d_sae = a.sizes[0]
    init = trained_init(a.init, d_sae, dm.scale) if a.init_kind == "trained" else None
    steps, warmup = _timed_steps(a, d_sae), 2
    res: dict = {"d_sae": d_sae, "init": a.init_kind, "steps": steps}
    if init is not None:  # the init's L0 on a batch of these activations
        sae = SparseAutoencoder(dm.d_in, d_sae)
        sae.load_state_dict(init)
        with torch.no_grad():
            res["init_l0"] = float((sae.encode(dm.sample_activations(a.batch, seed=1)) > 0).sum(1).float().mean())
    arms = {"lightning_fp32": lambda: lightning_tokens_per_s(a.shards, d_sae, a.batch, steps, warmup, "32-true",
                                                             a.l1, True, init),
            "lightning_bf16": lambda: lightning_tokens_per_s(a.shards, d_sae, a.batch, steps, warmup,
                                                             "bf16-mixed", a.l1, True, init),
            "hand_rule_fp32": lambda: hand_tokens_per_s(a.shards, d_sae, a.batch, steps, warmup, "32-true", a.l1,
                                                        True, init)}
    if a.init_kind == "fresh":  # a dense step costs the same from any init
        arms["hand_dense_fp32"] = lambda: hand_tokens_per_s(a.shards, d_sae, a.batch, steps, warmup, "32-true",
                                                            a.l1, False, None)
    for name, fn in arms.items():
        res[name] = fn()
        print(f"d_sae {d_sae} {a.init_kind}: {name} {res[name]:,.0f} tok/s", flush=True)
    return res


def _timed_steps(a, d_sae: int) -> int:
    """Timed steps per arm: ``--steps``, a quarter of it (at least 3) above 8,192 features."""
    return a.steps if d_sae <= 8192 else max(3, a.steps // 4)


def _median_step_s(step, n: int, warmup: int) -> float:
    times = []
    for _ in range(n + warmup):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def _compile_arm(sae, x_BM, l1: float, sparse: bool, steps: int) -> dict:
    """Eager, then compiled, per-step times of one SAE's loss forward + backward + Adam step on ``x_BM``."""
    import torch
    import torch.nn.functional as F

    from monosemantic.models.components.sparse_step import sparse_forward

    opt = torch.optim.Adam(sae.parameters(), lr=1e-5)  # small: the sparsity stays as it started

    def loss_fn(x):
        if not sparse:
            x_hat, f, _ = sae.forward_train(x)
            return F.mse_loss(x_hat, x) + l1 * f.sum(-1).mean()
        out = sparse_forward(sae, x)
        return F.mse_loss(out.x_hat, x) + l1 * out.feats.vals.sum() / x.shape[0]

    def step(fn):
        def go():
            loss = fn(x_BM)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return go

    res = {"eager_s": _median_step_s(step(loss_fn), steps, 2)}
    compiled = torch.compile(loss_fn)
    t0 = time.perf_counter()
    step(compiled)()
    res["compile_s"] = time.perf_counter() - t0
    res["compiled_s"] = _median_step_s(step(compiled), steps, 2)
    return res


def part_compile(a) -> dict:
    """``torch.compile`` against eager on the same SAE, batch and optimizer: the dense loss (fresh init) and
    the sparse step (trained init), fp32. The first compiled call's time is the compile cost."""
    import torch

    from monosemantic.data.activation_datamodule import ActivationDataModule
    from monosemantic.models.components.sae import SparseAutoencoder

    dm = ActivationDataModule(shards=str(a.shards), batch_size=a.batch, lr_windows=0)
    dm.setup()
    d_sae = a.sizes[0]
    x_BM = dm.sample_activations(a.batch, seed=0)
    steps = _timed_steps(a, d_sae)
    res: dict = {"d_sae": d_sae, "steps": steps}
    arms = {"dense": None, **({"sparse": trained_init(a.init, d_sae, dm.scale)} if a.init else {})}
    for arm, init in arms.items():
        torch.manual_seed(0)
        sae = SparseAutoencoder(dm.d_in, d_sae)
        if init is not None:
            sae.load_state_dict(init)
        try:
            times = _compile_arm(sae, x_BM, a.l1, arm == "sparse", steps)
        except Exception as e:  # e.g. inductor without a C++ compiler: the other parts still run
            res[f"{arm}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            print(f"d_sae {d_sae} {arm}: torch.compile failed: {res[f'{arm}_error']}", flush=True)
            continue
        res.update({f"{arm}_{k}": v for k, v in times.items()})
        print(f"d_sae {d_sae} {arm}: eager {times['eager_s'] * 1e3:.0f} ms, compiled {times['compiled_s'] * 1e3:.0f} "
              f"ms (compile {times['compile_s']:.0f} s)", flush=True)
    return res


def _saelens_tokens_per_s(dm, d_sae: int, batch: int, steps: int):
    """SAELens's ``SAETrainer._train_step`` (its whole step: forward, loss, backward, clipping, Adam, its dead
    counters) on ``StandardTrainingSAE``, fresh init, fp32: the median step's tokens/s, and the SAE trained."""
    import torch
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=dm.d_in, d_sae=d_sae, l1_coefficient=5.0,
                                                        dtype="float32", device="cpu"))
    stream = iter(dm.stream("train"))
    batches = iter([next(stream).float() for _ in range(steps + 4)])
    cfg = SAETrainerConfig(total_training_samples=(steps + 4) * batch, train_batch_size_samples=batch,
                           lr=3e-4, lr_end=3e-5, device="cpu")
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    return batch / _median_step_s(lambda: trainer._train_step(sae, next(batches)), steps, 2), sae


def part_saelens(a) -> dict:
    """SAELens's own training step at each d_sae, fresh init (its step is dense: the same cost from any init),
    on batches of the same shards (run by the ``.venv-interop`` interpreter)."""
    import sae_lens
    import torch

    from monosemantic.data.activation_datamodule import ActivationDataModule

    dm = ActivationDataModule(shards=str(a.shards), batch_size=a.batch, lr_windows=0)
    dm.setup()
    rows = []
    for d_sae in a.sizes:
        rate, _ = _saelens_tokens_per_s(dm, d_sae, a.batch, _timed_steps(a, d_sae))
        rows.append({"d_sae": d_sae, "tokens_per_s": rate})
        print(f"SAELens {sae_lens.__version__} d_sae {d_sae}: {rate:,.0f} tok/s", flush=True)
    return {"rows": rows, "version": sae_lens.__version__, "threads": torch.get_num_threads()}


def _train_cmd(a, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, __file__, "--run-script", str(run_dir.with_suffix(".peak.json")),
            str(ROOT / "src" / "train.py"), "experiment=sae_4096", f"data.shards={a.shards}", "logger=csv",
            f"hydra.run.dir={run_dir}", f"seed={a.seed}", *a.stage_overrides, *extra]


def stage_result(run_dir: Path, usage: dict) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    train_s = m["timings_s"]["train SAE"]
    keep = ("mse", "explained_variance", "l0", "dead_frac", "loss_recovered", "kl", "ce_sae", "training_tokens",
            "d_sae")
    return {"metrics": {k: m[k] for k in keep if k in m}, "train_s": train_s,
            "tokens_per_s": m["training_tokens"] / train_s, **usage}


def stages(a, work: Path, which: list[tuple[str, list[str]]]) -> dict:
    res = {}
    for name, extra in which:
        run_dir = work / "".join(c if c.isalnum() else "_" for c in name)  # a Hydra override value: no spaces
        usage = run_child(_train_cmd(a, run_dir, extra), run_dir.with_suffix(".log"))
        usage.update(json.loads(run_dir.with_suffix(".peak.json").read_text()))
        res[name] = stage_result(run_dir, usage)
        print(f"{name}: {res[name]['tokens_per_s']:,.0f} tok/s, peak RSS {res[name]['peak_rss_mb']:,.0f} MB, "
              f"{res[name]['metrics']}", flush=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return res


def part_pipeline(a) -> dict:
    import bench_activations

    work = a.part_out.parent
    res = {}
    out = work / "bench_activations.json"
    bench_activations.main(["--model-dir", str(a.model_dir), "--shards", str(a.shards), "--repeats", "3",
                            "--n-contexts", str(a.cache_contexts), "--steps", str(a.pipeline_steps),
                            "--d-sae", str(256 if a.quick else 4096), "--sae-batch-size", str(a.batch),
                            "--out", str(out)])  # the demo's size, whatever the step rows' sizes
    res["activations"] = json.loads(out.read_text())
    out = work / "bench_onthefly.json"
    import bench_onthefly

    argv = ["bench_onthefly.py", "--model-dir", str(a.model_dir), "--shards", str(a.shards), "--batch", str(a.batch),
            "--repeats", "3", "--out", str(out)]
    if a.init:
        argv += ["--init", str(a.init)]
    if a.quick:
        argv += ["--buffer", "16384"]
    sys.argv = argv
    bench_onthefly.main()
    res["onthefly"] = json.loads(out.read_text())
    return res


# ---- the table ---------------------------------------------------------------------------------------------

def _k(v: float) -> str:
    return f"{v:,.0f}"


def markdown(r: dict) -> str:
    lines = [f"# `make bench` — {r['machine']}", "", f"{r['date']}; torch {r['torch']}, {r['threads']} threads; "
             f"d_in {r['d_in']}, batch {r['batch']}. Tokens/s are medians of per-step times; peak RSS per part.",
             ""]
    if "bounds" in r:
        lines += ["## The machine's bounds", "", "| d_sae | dtype | matmul GFLOP/s | dense bound tok/s | "
                  "sparse bound tok/s |", "| ---: | --- | ---: | ---: | ---: |"]
        lines += [f"| {b['d_sae']:,} | {b['dtype']} | {b['gflops']:.0f} | {_k(b['dense_bound'])} | "
                  f"{_k(b['sparse_bound'])} |" for b in r["bounds"]["rows"]]
        lines += [""]
    bound = {(b["d_sae"], b["dtype"]): b for b in r.get("bounds", {}).get("rows", [])}
    dense = {s["d_sae"]: s["hand_dense_fp32"] for s in r.get("step", []) if "hand_dense_fp32" in s}
    if r.get("step"):
        lines += ["## SAE training step (tokens/s)", "", "| d_sae | init (L0) | Lightning fp32 | Lightning bf16 | "
                  "hand loop, same rule, fp32 | hand loop, dense fp32 | Lightning bf16 ÷ dense | Lightning fp32 ÷ "
                  "its fp32 bound | peak RSS MB |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s in r["step"]:
            init = s["init"] + (f" ({s['init_l0']:.0f})" if "init_l0" in s else "")
            d = dense.get(s["d_sae"])
            ratio = f"{s['lightning_bf16'] / d:.1f}×" if d else "—"
            # a fresh init trains dense (its bound: 12·d_in·d_sae FLOPs a token), a trained one sparse (2·d_in·d_sae)
            b = bound.get((s["d_sae"], "fp32"))
            frac = (f"{s['lightning_fp32'] / b['dense_bound' if s['init'] == 'fresh' else 'sparse_bound']:.2f} "
                    f"({'dense' if s['init'] == 'fresh' else 'sparse'})") if b else "—"
            lines.append(f"| {s['d_sae']:,} | {init} | {_k(s['lightning_fp32'])} | {_k(s['lightning_bf16'])} | "
                         f"{_k(s['hand_rule_fp32'])} | {_k(d) if d else '—'} | {ratio} | {frac} | "
                         f"{s['peak_rss_mb']:,.0f} |")
        lines += [""]
    if r.get("compile"):
        lines += ["## `torch.compile` (loss forward + backward + Adam, fp32, ms per step)", "",
                  "| d_sae | path | eager | compiled | eager ÷ compiled | compile s | steps to repay it |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for c in r["compile"]:
            for arm in ("dense", "sparse"):
                if f"{arm}_error" in c:
                    lines.append(f"| {c['d_sae']:,} | {arm} | — | failed: {c[f'{arm}_error']} | — | — | — |")
                if f"{arm}_eager_s" not in c:
                    continue
                e, k, cs = c[f"{arm}_eager_s"], c[f"{arm}_compiled_s"], c[f"{arm}_compile_s"]
                # the first compiled call is the compile and one step: its excess over a step is the cost
                repay = f"{max(0.0, cs - k) / (e - k):,.0f}" if e > k else "never"
                lines.append(f"| {c['d_sae']:,} | {arm} | {1e3 * e:,.0f} | {1e3 * k:,.0f} | {e / k:.2f} | {cs:.0f} | "
                             f"{repay} |")
        lines += [""]
    if r.get("saelens"):
        sl = r["saelens"]
        if "skipped" in sl:
            lines += [f"SAELens's own step: not measured, {sl['skipped']}.", ""]
        else:
            lines += [f"## SAELens {sl['version']}'s own step (its `SAETrainer` step, fp32, tokens/s)", "",
                      "| d_sae | SAELens fp32 | ours, fresh, Lightning fp32 | ÷ SAELens | ours, trained, Lightning "
                      "fp32 | ÷ SAELens | ours, trained, Lightning bf16 | ÷ SAELens |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            ours = {(s["d_sae"], s["init"]): s for s in r.get("step", [])}
            for row in sl["rows"]:
                cells = [f"{row['d_sae']:,}", _k(row["tokens_per_s"])]
                for init, key in (("fresh", "lightning_fp32"), ("trained", "lightning_fp32"),
                                  ("trained", "lightning_bf16")):
                    o = ours.get((row["d_sae"], init))
                    cells += [_k(o[key]), f"{o[key] / row['tokens_per_s']:.1f}×"] if o else ["—", "—"]
                lines.append("| " + " | ".join(cells) + " |")
            lines += [""]
    if "stage" in r:
        lines += ["## The whole demo SAE stage (`experiment=sae_4096`, bf16-mixed, validation included)", "",
                  "| run | training tokens | train time s | tokens/s | ÷ dense fp32 loop | peak RSS MB | "
                  "RSS at ¼ / ½ / end MB |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, s in r["stage"].items():
            samp = [v for _, v in s["rss_samples"]] or [s["peak_rss_mb"]]
            q = " / ".join(f"{samp[min(len(samp) - 1, int(f * len(samp)))]:,.0f}" for f in (0.25, 0.5, 0.999))
            d = dense.get(s["metrics"].get("d_sae", 4096))
            ratio = f"{s['tokens_per_s'] / d:.1f}×" if d else "—"
            lines.append(f"| {name} | {s['metrics']['training_tokens']:,.0f} | {s['train_s']:,.0f} | "
                         f"{_k(s['tokens_per_s'])} | {ratio} | {s['peak_rss_mb']:,.0f} | {q} |")
        lines += [""]
    if "reference" in r:
        fast, ref = r["reference"]["shipped"], r["reference"]["dense_fp32"]
        lines += ["## Shipped fast path vs the dense fp32 reference (quarter-length stage, same data and seed)", "",
                  "| metric | shipped (bf16, measured sparse rule) | dense fp32 | difference |",
                  "| --- | ---: | ---: | ---: |"]
        for k in ("mse", "explained_variance", "l0", "dead_frac", "loss_recovered", "kl"):
            if k in fast["metrics"]:
                f, d = fast["metrics"][k], ref["metrics"][k]
                rel = f"{100 * (f - d) / abs(d):+.1f}%" if d else f"{f - d:+.4f}"
                lines.append(f"| {k} | {f:.4g} | {d:.4g} | {rel} |")
        lines += [f"| tokens/s | {_k(fast['tokens_per_s'])} | {_k(ref['tokens_per_s'])} | "
                  f"{fast['tokens_per_s'] / ref['tokens_per_s']:.1f}× |", ""]
    if "pipeline" in r:
        act, otf = r["pipeline"]["activations"], r["pipeline"]["onthefly"]
        c, s = act["caching"], act["sae"]
        lines += ["## Caching and loaders", "", "| what | rate | vs | ratio |", "| --- | ---: | --- | ---: |",
                  f"| write_activation_cache | {_k(statistics.median(c['cache_tokens_per_s']))} tok/s | bare forward "
                  f"{_k(statistics.median(c['bare_forward_tokens_per_s']))} tok/s | {c['ratio']:.2f} |",
                  f"| SAE steps from streamed shards | {statistics.median(s['streamed_steps_per_s']):.2f} steps/s | "
                  f"in-memory batches {statistics.median(s['in_memory_steps_per_s']):.2f} steps/s | "
                  f"{s['ratio']:.2f} |"]
        med = otf["medians"]
        for k in ("on the fly, every position", "on the fly, 1 in 4 positions", "cached shards"):
            lines.append(f"| {k} | {_k(med[k])} act/s | SAE step (trained init) {_k(med['SAE step'])} tok/s | "
                         f"{med[k] / med['SAE step']:.2f} |")
        lines += ["", f"Peak RSS of the pipeline part: {r['pipeline']['peak_rss_mb']:,.0f} MB.", ""]
    lines += ["Every row runs on the CPU: the script has no GPU rows yet.", ""]
    return "\n".join(lines)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"


# ---- quick mode: tiny inputs of every kind -------------------------------------------------------------------

def quick_inputs(work: Path) -> tuple[Path, Path, Path]:
    """A tiny transformer, its cache and a short-trained SAE export, so every part runs in minutes."""
    from bench_activations import build_tiny_model

    from monosemantic.activation_cache import CacheSettings, write_activation_cache

    model_dir = build_tiny_model(work / "data")
    n_ctx = json.loads((model_dir / "config.json").read_text())["model"]["n_ctx"]
    shards = write_activation_cache(model_dir, work / "acts", CacheSettings(
        n_contexts=2048, tokens_per_context=n_ctx, contexts_per_shard=128, batch_size=64), progress=False)
    run_dir = work / "init"
    subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "experiment=sae_4096", f"data.shards={shards}",
                    "logger=csv", f"hydra.run.dir={run_dir}", *QUICK_STAGE], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"})
    return model_dir, shards, run_dir / "export"


QUICK_STAGE = ["model.d_sae=256", "scale.sae.batch_size=256", "scale.sae.max_steps=60",
               "scale.sae.resample_steps=[20]", "scale.sae.dead_window_tokens=2560", "scale.sae.l1_warmup_steps=5",
               "scale.sae.val_check_interval=60", "scale.sae.limit_val_batches=2", "scale.sae.buffer_tokens=8192",
               "scale.sae.n_loss_inputs=2048", "scale.sae.final_eval_lr_windows=16", "scale.sae.lr_windows=8",
               "model.b_dec_init_tokens=1024", "eval_min_tokens=1", "eval_min_lr_tokens=1"]


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="the demo cache (default: the newest data/activations/*demo*)")
    p.add_argument("--model-dir", type=Path, help="its transformer (default: from the cache's manifest)")
    p.add_argument("--init", type=Path, help="a demo SAE export (d_sae 4,096) for the trained rows")
    p.add_argument("--sizes", default="512,4096,32768", help="d_sae values of the step rows")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16, help="timed steps per arm (a quarter of it above 8,192)")
    p.add_argument("--l1", type=float, default=6e-3)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--parts", default=",".join(PARTS), help=f"a comma list of {PARTS}")
    p.add_argument("--long", action="store_true", help="also the demo stage 4× longer (memory; ~+20 min)")
    p.add_argument("--stage-sizes", default="32768",
                   help="d_sae values of quarter-length stages beside the demo stage (comma list; '' for none)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, every part: a check of this script")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--init-kind", default="fresh", help=argparse.SUPPRESS)
    p.add_argument("--d-in", type=int, default=512, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-script"]:
        return run_script(Path(argv[1]), argv[2], argv[3:])
    a = p.parse_args(argv)
    a.sizes = [int(s) for s in a.sizes.split(",")]
    a.stage_sizes = [int(s) for s in a.stage_sizes.split(",") if s.strip()]
    a.stage_overrides, a.cache_contexts, a.pipeline_steps = [], 1024, 10
    if a.part:  # in the child: one part, its JSON
        if a.quick:
            a.cache_contexts, a.pipeline_steps = 256, 4
        fn = {"bounds": part_bounds, "step": part_step, "compile": part_compile, "saelens": part_saelens,
              "pipeline": part_pipeline}[a.part]
        res = fn(a)
        a.part_out.write_text(json.dumps({**res, "peak_rss_mb": own_peak_mb()}))
        return None
    parts = a.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    work = Path(tempfile.mkdtemp(prefix="bench_table-"))
    try:
        if a.quick:
            a.model_dir, a.shards, a.init = quick_inputs(work)
            a.sizes, a.batch, a.steps, a.cache_contexts, a.pipeline_steps = [256, 1024], 256, 6, 256, 4
            a.stage_sizes = [1024]
            a.stage_overrides = QUICK_STAGE
            quarter = ["scale.sae.max_steps=30", "scale.sae.val_check_interval=30"]
        else:
            quarter = QUARTER
            if a.shards is None:
                sets = sorted((ROOT / "data" / "activations").glob("*demo*"), key=lambda q: q.stat().st_mtime)
                if not sets:
                    raise SystemExit("no demo cache under data/activations: run `make cache` (or pass --shards)")
                a.shards = sets[-1]
            if a.init is None:  # the newest standard SAE of 4,096 features on these activations (make train)
                def fits(cfg: dict) -> bool:
                    return (cfg.get("d_sae") == 4096 and cfg.get("architecture") == "standard"
                            and Path(cfg.get("metadata", {}).get("dataset_path", "")).name == a.shards.name)

                exports = sorted((q.parent for q in (ROOT / "logs").glob("**/export/cfg.json")
                                  if fits(json.loads(q.read_text()))), key=lambda q: q.stat().st_mtime)
                a.init = exports[-1] if exports else None
                print(f"trained init: {a.init or 'none found under logs/ (make train): fresh rows only'}")
        from monosemantic.data.shards.format import read_manifest

        manifest = read_manifest(a.shards)
        a.d_in = int(manifest["d_in"])
        if a.model_dir is None:
            a.model_dir = Path((manifest.get("model") or {}).get("checkpoint") or "")
        import torch

        r: dict = {"machine": machine(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "d_in": a.d_in, "batch": a.batch, "shards": str(a.shards),
                   "init": str(a.init) if a.init else None, "quick": a.quick}
        common = ["--shards", str(a.shards), "--batch", str(a.batch), "--steps", str(a.steps), "--l1", str(a.l1),
                  "--d-in", str(a.d_in)] + (["--quick"] if a.quick else [])
        a.out_dir.mkdir(parents=True, exist_ok=True)
        stem = "quick" if a.quick else f"{r['date']}"

        def save() -> None:  # after every part: a later failure loses nothing measured
            (a.out_dir / f"{stem}.json").write_text(json.dumps(r, indent=2))

        if "bounds" in parts:
            r["bounds"] = run_part("bounds", [*common, "--sizes", ",".join(map(str, a.sizes))], work)
            save()
        if "step" in parts:
            r["step"] = []
            for d_sae in a.sizes:
                for kind in ("fresh", "trained") if a.init else ("fresh",):
                    args = [*common, "--sizes", str(d_sae), "--init-kind", kind]
                    if a.init:
                        args += ["--init", str(a.init)]
                    r["step"].append(run_part("step", args, work, f"step-{d_sae}-{kind}"))
                    save()
        if "compile" in parts:
            r["compile"] = []
            for d_sae in a.sizes:
                args = [*common, "--sizes", str(d_sae)] + (["--init", str(a.init)] if a.init else [])
                r["compile"].append(run_part("compile", args, work, f"compile-{d_sae}"))
                save()
        if "saelens" in parts:
            if INTEROP_PYTHON.exists():
                r["saelens"] = run_part("saelens", [*common, "--sizes", ",".join(map(str, a.sizes))], work,
                                        python=INTEROP_PYTHON)
            else:
                print(f"saelens: skipped, {INTEROP_PYTHON} does not exist (make interop-env)")
                r["saelens"] = {"skipped": f"{INTEROP_PYTHON.relative_to(ROOT)} does not exist (make interop-env)"}
            save()
        if "stage" in parts:
            which = [("demo stage", [])]
            if a.long:
                steps = 4 * (60 if a.quick else 1700)
                which.append(("demo stage ×4", [f"scale.sae.max_steps={steps}"]))
            demo_d_sae = 256 if a.quick else 4096
            for d_sae in a.stage_sizes:  # the recipe at another size, a quarter of the run (its schedule scaled)
                if d_sae != demo_d_sae:
                    which.append((f"quarter stage, d_sae {d_sae:,}", [*quarter, f"model.d_sae={d_sae}"]))
            r["stage"] = stages(a, work, which)
            save()
        if "reference" in parts:
            ref = stages(a, work, [("shipped", quarter), ("dense_fp32", [*quarter, *REFERENCE])])
            r["reference"] = ref
            save()
        if "pipeline" in parts:
            args = [*common, "--model-dir", str(a.model_dir)]
            r["pipeline"] = run_part("pipeline", args + (["--init", str(a.init)] if a.init else []), work)
            save()
        save()
        table = markdown(r)
        (a.out_dir / f"{stem}.md").write_text(table)
        print(table)
        print(f"wrote {a.out_dir / (stem + '.md')} and .json")
        return r
    except BaseException:
        keep = a.out_dir / f"failed-{os.getpid()}"
        shutil.copytree(work, keep, ignore=shutil.ignore_patterns("*.ckpt", "*.safetensors", "*.tar"))
        print(f"the parts' logs are kept in {keep}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
