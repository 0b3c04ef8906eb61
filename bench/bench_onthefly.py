"""On-the-fly activations against the SAE step and the cached loader, side by side in one run.

Arms, each repeat back to back (drift on a shared machine hits all of them):
(a) on the fly, every position: ``OnTheFlyDataModule`` batches/s with the demo's sampling (all ``n_ctx``
    positions of each context), the transformer on ``--device``;
(b) on the fly, paper proportion: ``tokens_per_context = n_ctx / 4`` (the paper samples 250 of 1,024), so each
    activation costs 4 forward tokens;
(c) cached: ``ActivationDataModule`` batches/s over the shard set;
(d) the SAE step: ``bench_sae.hand_tokens_per_s`` (sparsity-aware step from ``--init``, Adam, decoder hygiene).
Rates are activations/s; the table gives medians over repeats and each source's ratio to the SAE step (≥ 1:
the source keeps up). With ``--paper-projection`` it adds the wall time of the paper's runs at the measured
rates: the A/1 SAE (8.2B activations at 250 of 1,024 positions, i.e. 33.6B forward tokens, at batch 8,192)
and the transformer (100B tokens, timed here as forward-only: a lower bound).

    python bench/bench_onthefly.py --quick                    # tiny untrained model and cache, < 1 min
    python bench/bench_onthefly.py --model-dir data/models/<transformer> --shards data/activations/<set> \
        --init logs/sae_4096/runs/<run>/export --out bench_onthefly.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_activations import build_tiny_model, sync  # noqa: E402
from bench_sae import hand_tokens_per_s  # noqa: E402

from monosemantic.activation_cache import CacheSettings, write_activation_cache  # noqa: E402
from monosemantic.data.activation_datamodule import ActivationDataModule  # noqa: E402
from monosemantic.data.onthefly import OnTheFlyDataModule  # noqa: E402
from monosemantic.data.shards.format import read_manifest  # noqa: E402

PAPER_ACTS, PAPER_FWD_PER_ACT, PAPER_LM_TOKENS = 8.2e9, 1024 / 250, 100e9


def rate(stream, n_batches: int, device: str) -> float:
    """Activations/s over ``n_batches`` batches (after the first, which pays for the model's first move)."""
    it = iter(stream)
    next(it)
    sync(device)
    t0, rows = time.perf_counter(), 0
    for _, x in zip(range(n_batches), it):
        rows += len(x)
    sync(device)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--shards", type=Path, help="a shard set of --model-dir (for the cached arm)")
    p.add_argument("--init", type=Path, help="an SAE export (realistic sparsity for the SAE step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--buffer", type=int, default=262_144, help="activations per shuffled chunk")
    p.add_argument("--chunks", type=int, default=2, help="chunks timed per on-the-fly arm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paper-projection", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    tmp = None
    if a.model_dir is None or a.shards is None:
        tmp = tempfile.TemporaryDirectory()
        a.model_dir = build_tiny_model(Path(tmp.name))
        n = json.loads((a.model_dir / "config.json").read_text())["model"]["n_ctx"]
        a.shards = write_activation_cache(a.model_dir, Path(tmp.name) / "acts",
                                          CacheSettings(n_contexts=2048, tokens_per_context=n,
                                                        contexts_per_shard=256, batch_size=64), progress=False)
    if a.quick:
        a.batch, a.d_sae, a.buffer, a.repeats = 1024, 1024, 65_536, 2
    m = read_manifest(a.shards)
    n_ctx = int(m["n_ctx"])
    n_batches = a.chunks * a.buffer // a.batch
    init = None
    if a.init is not None:
        from monosemantic.export import load_sae

        sae, _ = load_sae(a.init)
        dm = ActivationDataModule(shards=str(a.shards), lr_windows=0)
        dm.setup()
        init = {k: v * dm.scale if k in ("b_enc", "b_dec") else v for k, v in sae.state_dict().items()}
        a.d_sae = sae.d_sae
    arms: dict[str, list[float]] = {"on the fly, every position": [], "on the fly, 1 in 4 positions": [],
                                    "cached shards": [], "SAE step": []}
    for r in range(a.repeats):
        for name, k in (("on the fly, every position", n_ctx), ("on the fly, 1 in 4 positions", n_ctx // 4)):
            dm = OnTheFlyDataModule(model_dir=str(a.model_dir), tokens_per_context=k, contexts_per_block=256,
                                    batch_size=a.batch, buffer_tokens=a.buffer, lr_windows=0, device=a.device,
                                    seed=r)
            dm.setup()
            arms[name].append(rate(dm.stream("train"), n_batches, a.device))
        dm = ActivationDataModule(shards=str(a.shards), batch_size=a.batch, buffer_tokens=a.buffer, lr_windows=0,
                                  seed=r)
        dm.setup()
        arms["cached shards"].append(rate(dm.stream("train"), n_batches, "cpu"))
        arms["SAE step"].append(hand_tokens_per_s(a.shards, a.d_sae, a.batch, 10, 2, "32-true", 8e-3, True, init))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in arms.items()), flush=True)
    med = {k: statistics.median(v) for k, v in arms.items()}
    sae = med["SAE step"]
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{device}; d_in {m['d_in']}, n_ctx {n_ctx}, batch {a.batch}, d_sae {a.d_sae}, chunk {a.buffer:,}")
    print(f"| source | activations/s (median of {a.repeats}) | ÷ SAE step |\n| --- | ---: | ---: |")
    for k, v in med.items():
        print(f"| {k} | {v:,.0f} | {v / sae:.2f} |")
    res = {"device": device, "d_in": m["d_in"], "n_ctx": n_ctx, "batch": a.batch, "d_sae": a.d_sae,
           "buffer": a.buffer, "rates": arms, "medians": med}
    if a.paper_projection:
        fwd = med["on the fly, every position"]  # forward tokens/s = activations/s when every position is kept
        fed = min(fwd / PAPER_FWD_PER_ACT, sae)
        res["projection_h"] = {"A/1 SAE, 8.2B activations on the fly": PAPER_ACTS / fed / 3600,
                               "transformer forward, 100B tokens (lower bound)": PAPER_LM_TOKENS / fwd / 3600}
        for k, v in res["projection_h"].items():
            print(f"projected on this device: {k}: {v:,.0f} h")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
