"""Up-front checks of a composed config: a value of the wrong type or a size below 1 stops the run before any
stage starts (no W&B run, no Lightning, no half-built artifact), naming the key and, for an interpolated value,
the key it came from (``data.batch_size=0 (from scale.sae.batch_size)``).

What each key should be is read from where it is used: the type hints of the class a ``_target_`` node builds
(``SAEModule(d_sae: int, …)``), or of a settings dataclass (:class:`~monosemantic.activation_cache.CacheSettings`),
so a new argument is checked without a schema to keep in step. Only plain hints are checked (``int``, ``float``,
``bool``, ``str``, their ``| None``, ``list[int]``); anything richer is left to the class itself.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from monosemantic.errors import ConfigError

# integer arguments that count something: 0 or less can only fail later, deep inside a stream or a layer
POSITIVE = frozenset({
    "batch_size", "val_batch_size", "lr_batch_size", "forward_batch", "buffer_tokens", "d_sae", "d_in", "d_model",
    "d_mlp", "d_head", "n_heads", "n_layers", "n_ctx", "vocab_size", "n_contexts", "tokens_per_context",
    "contexts_per_shard", "contexts_per_block", "dead_window_tokens", "n_loss_inputs", "score_chunk", "k", "aux_k",
    "aux_dead_tokens", "b_dec_init_tokens", "val_tokens",
})
_SIMPLE = (int, float, bool, str, type(None))


def _hints(target: Any) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # a hint that does not resolve here: nothing to check against
        return {}


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _expected(hint: Any, value: Any) -> str | None:
    """What ``value`` should have been for ``hint``; None when it fits (or the hint is not a plain one)."""
    members = _members(hint)
    if any(typing.get_origin(m) is list and typing.get_args(m) == (int,) for m in members):
        if isinstance(value, (list, tuple)) and not all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value):
            return "a list of integers"
        return None
    if not all(m in _SIMPLE for m in members):
        return None
    if value is None:  # null is often "filled in by the stage" (model.d_in, model.net.vocab_size)
        return None
    if isinstance(value, bool):
        return None if bool in members else _describe(members)
    if isinstance(value, int):
        return None if int in members or float in members else _describe(members)
    if isinstance(value, float):
        if float in members:
            return None
        return _describe(members) + (f" (write {int(value)})" if value.is_integer() else "")
    if isinstance(value, str):
        return None if str in members else _describe(members)
    return None


def _describe(members: tuple[Any, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    out = [names[m] for m in members if m in names]
    return " or ".join(out) + (" or null" if type(None) in members else "")


def _source(node: DictConfig, key: str) -> str:
    raw = node._get_node(key)._value()
    if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and raw.count("${") == 1:
        return f" (from {raw[2:-1]})"
    return ""


def check_node(node: DictConfig, target: Any, path: str) -> None:
    """``node``'s values against ``target``'s type hints; :class:`ConfigError` naming ``path.key`` if one is off."""
    hints = _hints(target)
    for key in node:
        key = str(key)
        if key.startswith("_") or key not in hints:
            continue
        try:
            value = node[key]
        except Exception:  # missing (???) or an interpolation that does not resolve yet: the stage reports it
            continue
        if isinstance(value, DictConfig):
            continue
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        full = f"{path}.{key}" if path else key
        expected = _expected(hints[key], value)
        if expected:
            raise ConfigError(f"{full}={value!r}{_source(node, key)}: expected {expected}")
        if (key in POSITIVE and isinstance(value, int) and not isinstance(value, bool) and value < 1):
            raise ConfigError(f"{full}={value!r}{_source(node, key)}: expected a positive integer")


def check_targets(cfg: DictConfig, path: str = "") -> None:
    """Every ``_target_`` node under ``cfg`` against the hints of what it builds."""
    if "_target_" in cfg:
        try:
            from hydra.utils import get_object

            target = get_object(str(cfg._target_))
        except Exception:  # an unknown target: instantiating it names it
            target = None
        if target is not None:
            check_node(cfg, target, path)
    for key in cfg:
        try:
            child = cfg[key]
        except Exception:
            continue
        if isinstance(child, DictConfig):
            check_targets(child, f"{path}.{key}" if path else str(key))
