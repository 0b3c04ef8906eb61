"""Benchmark the activation pipeline against its bare baselines, side by side in one run.

(a) Caching: ``write_activation_cache`` tokens/s (the whole call: model load, forward, gather, tar writing,
    the manifest) vs a bare forward that stops at the MLP (``net.mlp_acts``, no unembedding) over the same
    token windows and batch size. The baseline's windows are stacked on the host before timing, so it
    times only host→device copy + forward. Target: ratio ≥ 0.8.
(b) SAE training: steps/s with batches streamed from the shards (``ActivationDataModule.train_dataloader``)
    vs batches sliced from a tensor already on the device, with the same step (``SparseAutoencoder`` +
    Adam, fp32, MSE + L1, decoder hygiene as in training). Target: ratio ≥ 0.9.

Each repeat times both arms back to back (so drift on a shared machine hits both); a ratio is the ratio of
the medians over repeats.

    python bench/bench_activations.py --quick                     # tiny set built on the fly, < 1 min on CPU
    python bench/bench_activations.py --model-dir data/models/<transformer> --shards data/activations/<set> \
        --device cuda --out bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from monosemantic.activation_cache import CacheSettings, context_starts, write_activation_cache
from monosemantic.data.activation_datamodule import ActivationDataModule
from monosemantic.data.shards.format import read_manifest
from monosemantic.data.token_store import load_split
from monosemantic.models.components.sae import SparseAutoencoder
from monosemantic.models.transformer_module import load_transformer

log = logging.getLogger("bench_activations")

CACHE_TARGET, SAE_TARGET = 0.8, 0.9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- a tiny model when none is given (the test fixtures' recipe, untrained: speed does not care) -------

def build_tiny_model(root: Path) -> Path:
    from monosemantic.data.corpus import CorpusConfig
    from monosemantic.data.token_store import build_token_store, read_meta
    from monosemantic.data.tokenizer import TokenizerConfig
    from monosemantic.models.components.transformer import Transformer
    from monosemantic.models.transformer_module import export_transformer

    store = build_token_store(CorpusConfig(kind="python_stdlib", max_bytes=400_000),
                              TokenizerConfig(kind="bpe", vocab_size=512), root, val_fraction=0.1)
    torch.manual_seed(0)
    meta = read_meta(store)
    net = Transformer(vocab_size=meta["vocab_size"], n_ctx=32, d_model=32, n_heads=2, d_head=16, d_mlp=64)
    return export_transformer(net, root / "models" / "tiny", store / meta["tokenizer"],
                              {"token_store": str(store), "n_ctx": 32})


# ---- (a) caching vs bare forward ------------------------------------------------------------------------

@torch.inference_mode()
def bare_forward_tokens_per_s(model_dir: Path, s: CacheSettings, device: str) -> float:
    net, cfg = load_transformer(model_dir, device)
    n_ctx = int(cfg["model"]["n_ctx"])
    tokens = load_split(cfg["token_store"], s.split)
    starts = context_starts(len(tokens), n_ctx, s.n_contexts, s.seed)
    batches = [torch.from_numpy(np.stack([tokens[i : i + n_ctx] for i in starts[b : b + s.batch_size]])
                                .astype(np.int64)) for b in range(0, s.n_contexts, s.batch_size)]
    if device.startswith("cuda"):
        batches = [b.pin_memory() for b in batches]
    net.mlp_acts(batches[0].to(device))  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    for ctx_BT in batches:
        net.mlp_acts(ctx_BT.to(device, non_blocking=True))
    sync(device)
    return s.n_contexts * n_ctx / (time.perf_counter() - t0)


def caching_tokens_per_s(model_dir: Path, s: CacheSettings, device: str, out: Path) -> float:
    n_ctx = int(json.loads((model_dir / "config.json").read_text())["model"]["n_ctx"])
    sync(device)
    t0 = time.perf_counter()
    write_activation_cache(model_dir, out, s, device=device, progress=False)
    sync(device)
    return s.n_contexts * n_ctx / (time.perf_counter() - t0)


def bench_caching(model_dir: Path, s: CacheSettings, device: str, repeats: int, work: Path) -> dict:
    # one untimed round of each arm: page the token store in, initialise kernels
    warm = CacheSettings(**{**vars(s), "n_contexts": min(s.n_contexts, s.batch_size)})
    caching_tokens_per_s(model_dir, warm, device, work / "warm")
    shutil.rmtree(work / "warm")
    bare_forward_tokens_per_s(model_dir, warm, device)
    cache_tps, bare_tps = [], []
    for r in range(repeats):
        cache_tps.append(caching_tokens_per_s(model_dir, s, device, work / f"cache-{r}"))
        if r < repeats - 1:
            shutil.rmtree(work / f"cache-{r}")  # the last one may serve as the shard set for (b)
        bare_tps.append(bare_forward_tokens_per_s(model_dir, s, device))
        log.info("caching repeat %d: %.0f tok/s cached, %.0f tok/s bare forward", r, cache_tps[-1], bare_tps[-1])
    return {"settings": vars(s), "cache_tokens_per_s": cache_tps, "bare_forward_tokens_per_s": bare_tps,
            "ratio": statistics.median(cache_tps) / statistics.median(bare_tps), "target": CACHE_TARGET}


# ---- (b) SAE steps from shards vs from memory ---------------------------------------------------------

def sae_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x_BM: torch.Tensor, l1_coeff: float) -> None:
    """The training step of ``SAEModule`` without logging: MSE + L1, parallel-grad removal, unit decoder."""
    out = sae(x_BM)
    loss = F.mse_loss(out.x_hat, x_BM) + l1_coeff * out.feats.sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grads_()
    opt.step()
    sae.normalize_decoder_()


def time_steps(batches, d_in: int, d_sae: int, steps: int, warmup: int, device: str) -> float:
    """Steps/s over ``steps`` steps after ``warmup`` untimed ones; ``batches`` yields host or device tensors."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in, d_sae).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    it = iter(batches)
    for _ in range(warmup):
        sae_step(sae, opt, next(it).to(device, non_blocking=True), 3e-3)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        sae_step(sae, opt, next(it).to(device, non_blocking=True), 3e-3)
    sync(device)
    return steps / (time.perf_counter() - t0)


def bench_sae(shards: Path, d_sae: int, batch_size: int, steps: int, warmup: int, repeats: int, device: str,
              num_workers: int, buffer_tokens: int) -> dict:
    dm = ActivationDataModule(shards=str(shards), batch_size=batch_size, buffer_tokens=buffer_tokens,
                              num_workers=num_workers, seed=0, lr_windows=0)
    dm.setup()
    need = batch_size * (steps + warmup)
    x_NM = dm.sample_activations(need, seed=0).to(device)  # fewer if the shards hold fewer: we cycle
    n_mem = x_NM.shape[0] // batch_size
    if n_mem == 0:
        raise SystemExit(f"{shards}: the training shards hold fewer than one batch of {batch_size}")

    def in_memory():
        i = 0
        while True:
            yield x_NM[(i % n_mem) * batch_size : (i % n_mem + 1) * batch_size]
            i += 1

    streamed_sps, memory_sps = [], []
    for r in range(repeats):
        streamed_sps.append(time_steps(dm.train_dataloader(), dm.d_in, d_sae, steps, warmup, device))
        memory_sps.append(time_steps(in_memory(), dm.d_in, d_sae, steps, warmup, device))
        log.info("SAE repeat %d: %.2f steps/s streamed, %.2f steps/s in memory", r, streamed_sps[-1],
                 memory_sps[-1])
    return {"shards": str(shards), "d_in": dm.d_in, "d_sae": d_sae, "batch_size": batch_size, "steps": steps,
            "warmup_steps": warmup, "num_workers": num_workers, "buffer_tokens": buffer_tokens,
            "streamed_steps_per_s": streamed_sps, "in_memory_steps_per_s": memory_sps,
            "ratio": statistics.median(streamed_sps) / statistics.median(memory_sps), "target": SAE_TARGET}


# ---- CLI ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="an exported transformer folder (default: a tiny one "
                   "built in a temp dir, or the one named by --shards' manifest)")
    p.add_argument("--shards", type=Path, help="a shard-set directory for (b) (default: the last set (a) wrote)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: a check that runs in under a minute")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-contexts", type=int, help="contexts cached per repeat (default 4096; quick 512)")
    p.add_argument("--tokens-per-context", type=int, help="default: every position, as the demo caches "
                   "(the model's n_ctx); quick 16")
    p.add_argument("--contexts-per-shard", type=int, help="default 1024 (the demo's); quick 64")
    p.add_argument("--cache-batch-size", type=int, default=64, help="contexts per forward (both arms)")
    p.add_argument("--sae-batch-size", type=int, help="default 4096; quick 1024")
    p.add_argument("--d-sae", type=int, help="default 4096; quick 1024")
    p.add_argument("--steps", type=int, help="timed SAE steps per arm and repeat (default 20; quick 10)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the streamed arm")
    p.add_argument("--buffer-tokens", type=int, help="shuffle buffer (default 262144; quick 8192)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--skip-cache", action="store_true", help="only (b)")
    p.add_argument("--skip-sae", action="store_true", help="only (a)")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (the ratios are medians)")
    quick = args.quick
    for name, full, small in [("n_contexts", 4096, 512), ("tokens_per_context", None, 16),
                              ("contexts_per_shard", 1024, 64), ("sae_batch_size", 4096, 1024),
                              ("d_sae", 4096, 1024), ("steps", 20, 10), ("buffer_tokens", 262_144, 8192)]:
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def table(results: dict) -> str:
    rows = [("arm", "median", "unit", "repeats")]
    if "caching" in results:
        c = results["caching"]
        rows += [("write_activation_cache", c["cache_tokens_per_s"], "tok/s"),
                 ("bare forward to MLP", c["bare_forward_tokens_per_s"], "tok/s")]
    if "sae" in results:
        s = results["sae"]
        rows += [("SAE step, streamed shards", s["streamed_steps_per_s"], "steps/s"),
                 ("SAE step, in-memory tensor", s["in_memory_steps_per_s"], "steps/s")]
    lines = [f"{rows[0][0]:<28} {rows[0][1]:>12} {rows[0][2]:<8} {rows[0][3]}"]
    for name, vals, unit in rows[1:]:
        lines.append(f"{name:<28} {statistics.median(vals):>12,.1f} {unit:<8} "
                     + ", ".join(f"{v:,.1f}" for v in vals))
    for key, what in [("caching", "caching / bare forward"), ("sae", "streamed / in-memory")]:
        if key in results:
            r = results[key]
            verdict = "ok" if r["ratio"] >= r["target"] else "BELOW TARGET"
            lines.append(f"ratio {what:<22} {r['ratio']:>6.3f}   target >= {r['target']}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bench_activations-"))
    try:
        model_dir = args.model_dir
        if model_dir is None and args.shards is not None:  # the transformer the shard set came from, if any
            ckpt = (read_manifest(args.shards).get("model") or {}).get("checkpoint")
            model_dir = Path(ckpt) if ckpt and (Path(ckpt) / "config.json").is_file() else None
        needs_model = not args.skip_cache or args.shards is None
        if model_dir is None and needs_model:
            log.info("no transformer given: building a tiny token store and transformer in %s", work)
            model_dir = build_tiny_model(work / "data")
        results: dict = {"device": args.device, "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                         "model_dir": str(model_dir) if model_dir else None}
        if args.tokens_per_context is None and model_dir is not None:  # every position, as the demo
            args.tokens_per_context = int(json.loads((model_dir / "config.json").read_text())["model"]["n_ctx"])
        settings = CacheSettings(n_contexts=args.n_contexts, tokens_per_context=args.tokens_per_context,
                                 contexts_per_shard=args.contexts_per_shard, batch_size=args.cache_batch_size)
        shards = args.shards
        if not args.skip_cache:
            results["caching"] = bench_caching(model_dir, settings, args.device, args.repeats, work)
            shards = shards or work / f"cache-{args.repeats - 1}"  # the last set (a) wrote
        if not args.skip_sae:
            if shards is None:
                shards = write_activation_cache(model_dir, work / "shards", settings, args.device, progress=False)
            results["sae"] = bench_sae(shards, args.d_sae, args.sae_batch_size, args.steps, args.warmup_steps,
                                       args.repeats, args.device, args.num_workers, args.buffer_tokens)
            if args.shards is None:
                results["sae"]["shards"] += " (temporary, deleted)"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
