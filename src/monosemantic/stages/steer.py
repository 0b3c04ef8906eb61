"""The steering stage, ``src/steer.py``: continue a prompt with SAE features pinned (default: to their maximum
activation observed on held-out text) or ablated, and print it beside the unsteered continuation drawn with
the same seed. Features are chosen by index (``features=[...]``) or by a token they fire on (``token=``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from monosemantic.errors import ConfigError
from monosemantic.models.components.hooks import pin_features
from monosemantic.stages.inputs import load_inputs, read_text
from monosemantic.steering import generate, scan_features
from monosemantic.utils.io import write_json_atomic

log = logging.getLogger(__name__)


def _value(spec, max_act: float, scale: float = 1.0) -> float | None:
    """``max`` (the observed maximum, times ``scale``), ``ablate`` (None) or a number."""
    if spec == "max":
        return max_act * scale
    if spec == "ablate":
        return None
    try:
        return float(spec)
    except (TypeError, ValueError):
        raise ConfigError(f"value={spec!r} is not 'max', 'ablate' or a number") from None


def edit_start(prompt_len: int, window_start: int, steer_prompt: bool) -> int:
    """First position of a window (starting at ``window_start`` in the whole sequence) that is edited. With
    ``steer_prompt`` false, the prompt is left alone except its last token, whose output picks the first new
    token: in a one-layer model an MLP edit reaches only its own position's logits."""
    return 0 if steer_prompt else max(0, prompt_len - 1 - window_start)


def run(cfg: DictConfig) -> dict:
    inp = load_inputs(cfg.ckpt_path, cfg.paths.log_dir, cfg.shards, cfg.transformer, cfg.token_store, cfg.device)
    sae, net, tok = inp.sae, inp.transformer, inp.tokenizer
    prompt_ids = tok.encode(cfg.prompt).ids
    token_id = None
    if cfg.token is not None:
        ids = tok.encode(str(cfg.token)).ids
        if len(ids) != 1:
            raise ConfigError(f"token={cfg.token!r} encodes to {len(ids)} tokens {ids}; choose features by a single "
                             "token (mind the leading space)")
        token_id = ids[0]
    if not isinstance(cfg.features, Sequence) or isinstance(cfg.features, str):
        raise ConfigError(f"features={cfg.features!r} must be a list of feature indices, e.g. features=[12]")
    if not cfg.features and token_id is None:
        raise ConfigError("choose features: features=[<index>, ...] or token=<a token they fire on>")
    features = [int(i) for i in cfg.features]
    for i in features:
        if not 0 <= i < sae.d_sae:
            raise ConfigError(f"features: {i} is not a feature index (the SAE has {sae.d_sae})")
    if len(set(features)) != len(features):
        raise ConfigError(f"features={features} repeats an index (each would add its edit again)")
    if float(cfg.temperature) < 0:
        raise ConfigError(f"temperature={cfg.temperature} must be ≥ 0 (0: greedy)")
    _value(cfg.value, 1.0)  # a bad value= fails before the scan
    text, _, by_split = read_text(inp.token_store, int(cfg.scan_tokens), inp.n_ctx)
    log.info("scanning %s tokens (%s) for the features' maximum activations", f"{len(text):,}",
             ", ".join(f"{v:,} {k}" for k, v in by_split.items()))
    max_F, score_F = scan_features(net, sae, text, token_id)
    if token_id is not None:
        if float(score_F.max()) <= 0:
            raise ConfigError(f"token={cfg.token!r}: no feature fires on it in the {len(text):,} scanned tokens "
                             "(raise scan_tokens=, or choose features=[...])")
        best = score_F.topk(int(cfg.n_features)).indices.tolist()
        log.info("features most specific to %r: %s", cfg.token,
                 ", ".join(f"{i} (score {float(score_F[i]):.3f}, max {float(max_F[i]):.3g})" for i in best))
        features += [i for i in best if i not in features]
    values = [_value(cfg.value, float(max_F[i]), float(cfg.value_scale)) for i in features]
    for i, v in zip(features, values):
        if v is not None and max_F[i] == 0:
            log.warning("feature %d never fired on the scanned text: value=max pins it to 0", i)

    def hook(window_start: int):
        start = edit_start(len(prompt_ids), window_start, bool(cfg.steer_prompt))
        return pin_features(sae, features, values, keep_error=cfg.keep_error, start=start)

    rows = []
    for k in range(int(cfg.n_samples)):
        seed = int(cfg.seed) + k
        kw = {"max_new_tokens": int(cfg.max_new_tokens), "seed": seed, "temperature": float(cfg.temperature),
              "top_k": cfg.top_k}
        base = generate(net, prompt_ids, **kw)
        steered = generate(net, prompt_ids, hook=hook, **kw)
        rows.append({"seed": seed, "baseline": tok.decode(base), "steered": tok.decode(steered),
                     "baseline_ids": base, "steered_ids": steered})
    what = ", ".join(f"{i}→{'ablated' if v is None else f'{v:.3g}'}" for i, v in zip(features, values))
    table = Table(title=f"prompt {cfg.prompt!r}; features {what}; "
                        f"{'delta form (error kept)' if cfg.keep_error else 'SAE reconstruction (error dropped)'}",
                  show_lines=True)
    table.add_column("seed", justify="right")
    table.add_column("baseline")
    table.add_column("steered")
    for r in rows:
        table.add_row(str(r["seed"]), r["baseline"], r["steered"])
    Console(width=int(cfg.width)).print(table)
    result = {"sae_path": str(inp.sae_path), "prompt": cfg.prompt, "features": features, "values": values,
              "keep_error": bool(cfg.keep_error), "steer_prompt": bool(cfg.steer_prompt),
              "max_activation": {i: float(max_F[i]) for i in features}, "samples": rows}
    write_json_atomic(Path(cfg.paths.output_dir) / "steer.json", result)
    return result
