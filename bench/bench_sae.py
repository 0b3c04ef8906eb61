"""SAE training throughput: the full Lightning path vs a minimal hand-written loop vs the matmul bound.

All three are measured in one run on the same machine:
(1) ``SAEModule`` + ``ActivationDataModule`` + ``lightning.Trainer`` (the real training path: streamed shards,
    logging, dead counter, density metric, decoder hygiene), timed per optimizer step by a callback;
(2) a hand-written PyTorch loop of the same math (``bench_activations.sae_step``: MSE + L1, parallel-grad
    removal, Adam, unit decoder) over batches of the same shards held in memory;
(3) the machine's fp32 (or bf16) matmul rate for this shape, turned into a dense-step bound of
    ``rate / (12·d_in·d_sae)`` tokens/s (forward 4, backward 8 FLOPs per weight per token).
Targets: (1)/(2) ≥ 0.9. Medians over repeats; each repeat times (1) then (2) back to back.

    python bench/bench_sae.py --shards data/activations/<set> [--precision bf16] [--out bench_sae.json]
    python bench/bench_sae.py --quick        # a small synthetic shard set built on the fly
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from bench_activations import sae_step

from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.synthetic import random_directions, write_synthetic_shards
from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.models.components.sparse_step import measure_step_costs, sparse_forward
from monosemantic.models.sae_module import SAEModule

TARGET = 0.9


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter())


def matmul_gflops(d_in: int, d_sae: int, batch: int, dtype: torch.dtype, reps: int = 10) -> float:
    a, b = torch.randn(batch, d_in, dtype=dtype), torch.randn(d_in, d_sae, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * batch * d_in * d_sae * reps / (time.perf_counter() - t0) / 1e9


def lightning_tokens_per_s(shards: Path, d_sae: int, batch: int, steps: int, warmup: int, precision: str,
                           l1: float, sparse: bool, init: dict | None, num_workers: int = 0) -> float:
    dm = ActivationDataModule(shards=str(shards), batch_size=batch, seed=0, lr_windows=0, num_workers=num_workers)
    dm.setup()
    module = SAEModule(d_sae=d_sae, l1_coeff=l1, optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                       d_in=dm.d_in, b_dec_init="zeros", dead_window_tokens=10**9, sparse_step=sparse)
    if init is not None:
        module.sae.load_state_dict(init)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps + warmup, accelerator="cpu", precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    dt = statistics.median(b - a for a, b in zip(timer.times[warmup:], timer.times[warmup + 1:]))
    return batch / dt


def sparse_sae_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x_BM: torch.Tensor, l1: float) -> float:
    """``sae_step`` with the sparsity-aware forward/backward, as ``SAEModule(sparse_step=True)`` runs it."""
    out = sparse_forward(sae, x_BM)
    loss = torch.nn.functional.mse_loss(out.x_hat, x_BM) + l1 * out.feats.vals.sum() / x_BM.shape[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grads_()
    opt.step()
    sae.normalize_decoder_()
    return out.feats.vals.numel() / x_BM.shape[0]


def hand_tokens_per_s(shards: Path, d_sae: int, batch: int, steps: int, warmup: int, precision: str,
                      l1: float, sparse: bool, init: dict | None) -> float:
    dm = ActivationDataModule(shards=str(shards), batch_size=batch, seed=0, lr_windows=0)
    dm.setup()
    x_NM = dm.sample_activations(batch * (steps + warmup), seed=0)
    n = x_NM.shape[0] // batch
    torch.manual_seed(0)
    sae = SparseAutoencoder(dm.d_in, d_sae)
    if init is not None:
        sae.load_state_dict(init)
    last_l0 = float(d_sae)  # the module's rule: sparse while the previous step's L0 < the measured crossover
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("bf16")
                else contextlib.nullcontext())
    crossover = 0.0
    if sparse:
        with autocast:
            crossover = measure_step_costs(sae, x_NM[:batch]).crossover()
    times = []
    for i in range(steps + warmup):
        with autocast:
            x_BM = x_NM[(i % n) * batch : (i % n + 1) * batch]
            if sparse and last_l0 < crossover * d_sae:
                last_l0 = sparse_sae_step(sae, opt, x_BM, l1)
            else:
                sae_step(sae, opt, x_BM, l1)
                with torch.no_grad():
                    last_l0 = float((sae.encode(x_BM) > 0).sum()) / x_BM.shape[0]
        times.append(time.perf_counter())
    return batch / statistics.median(b - a for a, b in zip(times[warmup:], times[warmup + 1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a shard-set directory (default: synthetic, built on the fly)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    p.add_argument("--l1", type=float, default=8e-3)
    p.add_argument("--init", type=Path, help="start from this SAE export (realistic sparsity); default: fresh init")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the Lightning path")
    p.add_argument("--dense", action="store_true", help="dense steps only (model.sparse_step=false)")
    p.add_argument("--quick", action="store_true", help="small synthetic set, d_sae 1024, 2 repeats")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    tmp = None
    if a.quick:
        a.d_sae, a.steps, a.repeats = 1024, 10, 2
    if a.shards is None:
        tmp = tempfile.TemporaryDirectory()
        d_in = 128 if a.quick else 512
        a.shards = write_synthetic_shards(Path(tmp.name), random_directions(4 * d_in, d_in), n_tokens=a.batch * 40,
                                          p_active=0.01, rows_per_sample=1024, samples_per_shard=8)
    d_in = ActivationDataModule(shards=str(a.shards), lr_windows=0).d_in

    init = None
    if a.init is not None:  # the export works on raw activations: bring it back to the normalised space
        from monosemantic.export import load_sae

        sae, _ = load_sae(a.init)
        dm = ActivationDataModule(shards=str(a.shards), lr_windows=0)
        dm.setup()
        scale = dm.scale
        init = {k: v * scale if k in ("b_enc", "b_dec") else v for k, v in sae.state_dict().items()}
    light, hand = [], []
    for r in range(a.repeats):
        light.append(lightning_tokens_per_s(a.shards, a.d_sae, a.batch, a.steps, a.warmup, a.precision, a.l1,
                                            not a.dense, init, a.num_workers))
        hand.append(hand_tokens_per_s(a.shards, a.d_sae, a.batch, a.steps, a.warmup, a.precision, a.l1,
                                      not a.dense, init))
        print(f"repeat {r}: lightning {light[-1]:,.0f} tok/s, hand loop {hand[-1]:,.0f} tok/s", flush=True)
    dtype = torch.bfloat16 if a.precision.startswith("bf16") else torch.float32
    gflops = statistics.median(matmul_gflops(d_in, a.d_sae, a.batch, dtype) for _ in range(3))
    bound = gflops * 1e9 / (12 * d_in * a.d_sae)
    res = {"shards": str(a.shards), "d_in": d_in, "d_sae": a.d_sae, "batch": a.batch, "precision": a.precision,
           "sparse_step": not a.dense, "num_workers": a.num_workers, "init": str(a.init) if a.init else None,
           "threads": torch.get_num_threads(), "lightning_tokens_per_s": light, "hand_tokens_per_s": hand,
           "matmul_gflops": gflops, "dense_bound_tokens_per_s": bound,
           "ratio_lightning_vs_hand": statistics.median(light) / statistics.median(hand),
           "fraction_of_dense_bound": statistics.median(light) / bound, "target": TARGET}
    print(f"\nSAE {d_in}→{a.d_sae}, batch {a.batch}, {a.precision}, {torch.get_num_threads()} threads")
    print(f"  Lightning path        {statistics.median(light):>10,.0f} tokens/s (median of {a.repeats})")
    print(f"  hand-written loop     {statistics.median(hand):>10,.0f} tokens/s")
    print(f"  matmul {gflops:6.1f} GFLOP/s → dense bound {bound:>10,.0f} tokens/s (12·d_in·d_sae FLOPs/token)")
    print(f"  Lightning / hand      {res['ratio_lightning_vs_hand']:.3f}  (target ≥ {TARGET})")
    print(f"  Lightning / bound     {res['fraction_of_dense_bound']:.3f}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
