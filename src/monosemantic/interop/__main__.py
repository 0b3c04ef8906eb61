"""``python -m monosemantic.interop {dashboard,saebench}`` (in the interop environment, ``make interop-env``)."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m monosemantic.interop", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dashboard", help="SAEDashboard's feature-centric HTML for chosen features")
    b = sub.add_parser("saebench", help="SAEBench core metrics beside ours, as JSON")
    for q in (d, b):
        q.add_argument("--sae", required=True, help="an SAE export folder (cfg.json + sae_weights.safetensors)")
        q.add_argument("--transformer", required=True, help="a transformer export folder (data/models/<key>)")
        q.add_argument("--windows", type=int, default=1024, help="held-out windows of n_ctx tokens")
    d.add_argument("--features", type=int, nargs="+", required=True)
    d.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from monosemantic.interop.dashboard import held_out_windows, render

    if a.cmd == "dashboard":
        print(render(a.sae, a.transformer, a.features, a.out, n_windows=a.windows))
        return
    from sae_lens import HookedSAETransformer

    from monosemantic.interop import saebench
    from monosemantic.interop.saelens import load_sae_lens
    from monosemantic.interop.tlens import to_hooked_transformer

    tokens = held_out_windows(a.transformer, a.windows - a.windows % 8).numpy()
    model = to_hooked_transformer(a.transformer, cls=HookedSAETransformer)
    theirs = saebench.run_core(load_sae_lens(a.sae), model, tokens)
    ours = saebench.our_metrics(a.sae, a.transformer, tokens)
    print(json.dumps({"windows": len(tokens), "saebench": theirs, "ours": ours}, indent=2))


if __name__ == "__main__":
    main()
