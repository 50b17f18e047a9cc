import json
import os

import numpy as np
import pytest

from ultramem_jax import data
from ultramem_jax.errors import UsageError
from ultramem_jax.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from ultramem_jax.train_config import DataConfig


NEEDS_GRAIN = pytest.mark.skipif(data.grain is None, reason="prepared (ArrayRecord) datasets need grain")


def _write_text(path, rng, paragraphs=60):
    words = ["alpha", "beta", "gamma", "delta", "omega", "lorem", "ipsum", "memory", "value", "key"]
    with open(path, "w") as f:
        for _ in range(paragraphs):
            f.write(" ".join(rng.choice(words, size=int(rng.integers(5, 30)))) + ".\n\n")


def test_split_is_deterministic_disjoint_and_complete(rng):
    docs = [f"doc {i} " + "x" * int(rng.integers(1, 20)) for i in range(200)]
    train, val = data.split_documents(docs, 0.1)
    train2, val2 = data.split_documents(docs, 0.1)
    assert (train, val) == (train2, val2)
    assert len(val) == 20 and set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)


def test_windows_pack_the_stream_without_gaps(rng):
    tokens = rng.integers(0, 100, 1000).astype(np.int32)
    src = data.WindowSource(data.ArrayStream(tokens), seq_len=16)
    assert len(src) == (1000 - 1) // 16
    for i in [0, 5, len(src) - 1]:
        np.testing.assert_array_equal(src[i], tokens[i * 16:i * 16 + 17])  # targets overlap the next window


@NEEDS_GRAIN
def test_prepared_arrayrecord_stream_matches_in_memory(tmp_path, rng):
    path = tmp_path / "corpus.txt"
    _write_text(path, rng, paragraphs=300)
    meta = data.prepare(str(path), str(tmp_path / "prep"), "byte", val_fraction=0.1, chunk_len=97,
                        shard_tokens=97 * 5)
    assert len(meta["train"]["files"]) > 1  # several shards, many chunk boundaries
    corpus = data.load_corpus(DataConfig(dataset=str(tmp_path / "prep")))
    docs = data.file_documents([str(path)], "auto", "text")
    train_docs, val_docs = data.split_documents(docs, 0.1)
    want = data.tokenize(train_docs, ByteTokenizer())
    assert len(corpus.train) == len(want)
    for start, length in [(0, 50), (90, 20), (96, 300), (len(want) - 7, 7)]:
        np.testing.assert_array_equal(corpus.train.read(start, length), want[start:start + length])
    with pytest.raises(UsageError, match="already holds"):
        data.prepare(str(path), str(tmp_path / "prep"))


def test_train_iterator_resumes_exactly(tmp_path, rng):
    stream = data.ArrayStream(rng.integers(0, 50, 5000).astype(np.int32))
    it = iter(data.train_dataset(stream, 16, 4, seed=3))
    [next(it) for _ in range(7)]
    state = it.get_state()
    want = [next(it) for _ in range(5)]
    it2 = iter(data.train_dataset(stream, 16, 4, seed=3))
    it2.set_state(state)
    for a in want:
        np.testing.assert_array_equal(a, next(it2))


def test_val_batches_cover_every_window_once(rng):
    stream = data.ArrayStream(rng.integers(0, 50, 1000).astype(np.int32))
    batches = list(data.val_batches(stream, 16, 5))
    n = (1000 - 1) // 16
    assert sum(int(m[:, 0].sum()) for _, m in batches) == n
    assert all(t.shape == (5, 17) for t, _ in batches)


def test_unigram_baseline_is_entropy_for_matching_distribution(rng):
    p = np.array([0.5, 0.25, 0.25])
    toks = rng.choice(3, size=200_000, p=p).astype(np.int32)
    ce = data.unigram_cross_entropy(data.ArrayStream(toks[:100_000]), data.ArrayStream(toks[100_000:]), 3)
    assert ce == pytest.approx(-(p * np.log(p)).sum(), abs=0.01)


def test_bpe_tokenizer_round_trip_and_bad_files(tmp_path, rng):
    texts = ["the memory layer reads values", "keys and queries and values"] * 50
    tok = BPETokenizer.train(texts, 300)
    path = tmp_path / "tok.json"
    tok.save(str(path))
    tok2 = load_tokenizer(str(path))
    assert tok2.decode(tok2.encode("the values")) == "the values"
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(UsageError, match="unreadable"):
        load_tokenizer(str(bad))
    with pytest.raises(UsageError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_bad_data_inputs_fail_clearly(tmp_path):
    with pytest.raises(UsageError, match="file not found"):
        data.load_corpus(DataConfig(dataset=str(tmp_path / "none.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UsageError, match="no text"):
        data.load_corpus(DataConfig(dataset=str(empty)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UsageError, match="bad.jsonl:1: record has no string field 'text'"):
        data.load_corpus(DataConfig(dataset=str(bad)))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(os.urandom(256) + b"\xff\xfe")
    with pytest.raises(UsageError, match="not UTF-8"):
        data.load_corpus(DataConfig(dataset=str(binary)))


def test_kjv_demo_corpus_is_found():
    docs = data.kjv_documents()
    assert len(docs) == 1189 and docs[0].startswith("Genesis 1\nIn the beginning")


def test_gzip_and_dictzip_text_and_decode_errors(tmp_path):
    import gzip
    docs = ["first entry \u00e9", "second entry", "third"]
    raw = "\n\n".join(docs).encode() + b"\n\nbad byte \x92 here"
    for suffix in (".txt.gz", ".dict.dz"):
        path = tmp_path / f"corpus{suffix}"
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
        with pytest.raises(UsageError, match="not UTF-8.*decode_errors=replace"):
            data.file_documents([str(path)], "auto", "text")
        got = data.file_documents([str(path)], "auto", "text", errors="replace")
        assert got[:3] == docs and got[3] == "bad byte \ufffd here"
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(UsageError, match="not a valid gzip file"):
        data.file_documents([str(broken)], "auto", "text")
    with pytest.raises(ValueError, match="data.decode_errors"):
        DataConfig(decode_errors="ignore")


def test_concat_stream_reads_across_the_seam(rng):
    parts = [rng.integers(0, 50, int(n)).astype(np.int32) for n in rng.integers(1, 40, 4)]
    stream, whole = data.ConcatStream(*[data.ArrayStream(p) for p in parts]), np.concatenate(parts)
    assert len(stream) == len(whole)
    for _ in range(20):
        start, length = int(rng.integers(0, len(whole))), int(rng.integers(0, 60))
        np.testing.assert_array_equal(stream.read(start, length), whole[start:start + length])


def test_without_grain_prepared_datasets_fail_clearly(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(data, "grain", None)  # as on the GPU image
    path = tmp_path / "corpus.txt"
    _write_text(path, rng)
    with pytest.raises(UsageError, match="needs grain"):
        data.prepare(str(path), str(tmp_path / "prep"))
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]
    with pytest.raises(UsageError, match="need grain"):
        data.ArrayRecordStream([str(tmp_path / "train-00000-of-00001.arrayrecord")], 97, 1000)


def test_val_dataset_replaces_the_document_split(tmp_path, rng):
    train_path, val_path = tmp_path / "train.txt", tmp_path / "val.txt"
    _write_text(train_path, rng, paragraphs=40)
    _write_text(val_path, rng, paragraphs=5)
    corpus = data.load_corpus(DataConfig(dataset=str(train_path), val_dataset=str(val_path)))
    as_bytes = lambda path: [p.encode() + b"\xff" for p in open(path).read().split("\n\n") if p.strip()]  # noqa: E731
    want = lambda path: np.concatenate(  # noqa: E731
        [np.frombuffer(b, np.uint8).astype(np.int32) for b in as_bytes(path)])
    eos = ByteTokenizer.eos_id
    for stream, path in ((corpus.train, train_path), (corpus.val, val_path)):
        w = want(path)
        w[w == 0xFF] = eos  # every paragraph, whole, then an end-of-document token
        np.testing.assert_array_equal(stream.read(0, len(stream)), w)
    if data.grain is None:  # a prepared validation set needs grain (the test above checks the refusal)
        return
    prep = tmp_path / "prep"
    data.prepare(str(val_path), str(prep), "bpe", bpe_vocab_size=300)
    with pytest.raises(UsageError, match="another tokenizer"):
        data.load_corpus(DataConfig(dataset=str(train_path), val_dataset=str(prep)))


def test_the_run_directory_carries_tokenizer_and_val_tokens(tmp_path, rng):
    path = tmp_path / "c.txt"
    _write_text(path, rng, paragraphs=50)
    corpus = data.load_corpus(DataConfig(dataset=str(path)))
    data.save_for_eval(corpus, str(tmp_path))
    os.remove(path)
    saved = data.load_run_corpus(str(tmp_path))
    np.testing.assert_array_equal(saved.val.read(0, len(saved.val)), corpus.val.read(0, len(corpus.val)))
    assert saved.tokenizer.decode(saved.tokenizer.encode("memory value")) == "memory value"
