"""Generation with a KV cache: one prefill, then a decode loop on device; batches of prompts of any lengths.

    python -m ultramem_jax.generate RUN_DIR --prompt TEXT [--prompts-file FILE] [--batch-size 8]
        [--max-new-tokens 200] [--temperature 0.8] [--top-k 40] [--top-p 1.0] [--seed S] [--context L]
        [--cache-dtype float32|bfloat16] [--step N] [key=value ...]

How a batch runs:
  prefill  prompts are right-padded to one length P and run through the model once, with causal attention as
           in training; each block's keys and values fill cache slots [0, P).  Sequence b's first new token is
           sampled from the logits at its last prompt token, len_b - 1.
  decode   each step feeds every sequence's newest token at its own position (RoPE position and cache slot =
           its length so far) and attends to the cache slots up to that position.  A short prompt's padding
           slots are masked until its own tokens overwrite them.  The loop is a ``lax.while_loop`` on device,
           run in chunks of ``chunk`` steps so that the CLI can print text between chunks.
  stop     a sequence stops at EOS (not emitted), after ``max_new_tokens``, or when prompt + output fill the
           context (the cache length).
Memory layers and MoE see only the tokens fed in: retrieval and routing run for the new tokens alone.
Sampling: greedy (temperature 0), or softmax(logits / temperature) after top-k and / or top-p (nucleus)
filtering.  Prompt i's key for its t-th new token is fold_in(fold_in(key(seed), i), t), so a fixed seed gives
the same text whatever the batch size and whichever prompts share the batch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ultramem_jax import sharding as sh
from ultramem_jax.errors import UsageError
from ultramem_jax.platforms import skip_absent_tpu


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: no limit
    top_p: float = 1.0  # keep the fewest most likely tokens whose probability reaches p; 1: no limit
    seed: int = 0

    def validate(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise UsageError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets the logits outside the top-k and outside the top-p nucleus to -inf (ties at the edge are kept)."""
    V = logits_BxV.shape[-1]
    if 0 < top_k < V:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the tokens ranked above
        keep_B = jnp.maximum(jnp.sum(before_BxV < top_p, axis=-1), 1)
        edge_Bx1 = jnp.take_along_axis(sorted_BxV, keep_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < edge_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def sample_tokens(logits_BxV: jax.Array, seq_ids_B: jax.Array, steps_B: jax.Array, sampling: Sampling):
    """One token per row; row b draws with the key of (prompt seq_ids[b], its new-token index steps[b])."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    base = jax.random.key(sampling.seed)
    keys_B = jax.vmap(lambda i, t: jax.random.fold_in(jax.random.fold_in(base, i), t))(seq_ids_B, steps_B)
    logits_BxV = filter_logits(logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)


def decode_logits(model, tokens_BxS: jax.Array, positions_BxS: jax.Array):
    """Logits B×S×V (float32) and aux of tokens at per-sequence positions, read against and written into the
    model's cache (``model.init_cache`` and a prefill first)."""
    return model(tokens_BxS, positions_BxS=positions_BxS)


@dataclasses.dataclass
class Result:
    tokens: list[list[int]]  # new tokens per prompt, EOS not included
    finish: list[str]  # per prompt: "eos", "length" (max_new_tokens) or "context" (the cache is full)
    prompt_tokens: int
    prefill_s: float
    decode_tokens: int  # tokens sampled by the decode loop (the first token of each prompt comes from prefill)
    decode_s: float
    compile_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / max(self.decode_s, 1e-9)


class Generator:
    """Compiled prefill and decode for one model; call ``generate`` with as many batches as you like.

    ``max_len``: the context, i.e. cache slots per sequence.  ``valid_vocab``: ids at or above it (the model's
    vocabulary padding) are never sampled.  With ``mesh`` and ``rules`` (and the model built on that mesh,
    e.g. with a value-table layout), batches and caches are split over the batch axes and the cache's heads
    over the ``heads`` rule; the batch is padded to a multiple of the token shards.
    """

    def __init__(self, model, max_len: int, *, max_new_tokens: int = 200, sampling: Sampling = Sampling(),
                 cache_dtype=None, chunk: int | None = None,
                 valid_vocab: int | None = None, mesh=None, rules=None):
        sampling.validate()
        if max_len < 2:
            raise UsageError(f"the context must hold at least 2 tokens, got {max_len}")
        if max_new_tokens < 1:
            raise UsageError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        self.max_len, self.max_new, self.sampling = max_len, max_new_tokens, sampling
        self.chunk = max(1, min(chunk or max_new_tokens, max_new_tokens))
        self.cache_dtype = jnp.dtype(cache_dtype or model.cfg.dtype)
        if self.cache_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise UsageError(f"cache dtype must be float32 or bfloat16, got {self.cache_dtype}")
        self.valid_vocab = valid_vocab
        self.mesh, self.rules = mesh, dict(rules or [])
        work = nnx.merge(*nnx.split(model))  # a copy: the caller's model gets no cache
        work.init_cache(1, 1, self.cache_dtype)
        self.graphdef, cache, self.params = nnx.split(work, nnx.Cache, ...)
        self._cache_template = cache  # shapes (1, 1, N, H): _empty_cache sizes the real one
        batch_axes = self.rules.get("batch")
        self.token_shards = 1
        if mesh is not None and batch_axes:
            axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
            self.token_shards = int(np.prod([mesh.shape[a] for a in axes]))
        self._compiled: dict = {}
        self.compile_s = 0.0  # compile seconds of the latest generate call

    # ---- the jitted pieces ---------------------------------------------------------------------------
    def _spec(self, *names):
        return NamedSharding(self.mesh, P(*(self.rules.get(n) if n else None for n in names)))

    def _empty_cache(self, batch: int):
        def zeros(a):
            z = jnp.zeros((batch, self.max_len) + a.shape[2:], a.dtype)
            if self.mesh is None:
                return z
            return jax.lax.with_sharding_constraint(z, self._spec("batch", None, sh.HEADS, None))
        return jax.tree.map(zeros, self._cache_template)

    def _limit_vocab(self, logits_BxV):
        if self.valid_vocab is None or self.valid_vocab >= logits_BxV.shape[-1]:
            return logits_BxV
        return jnp.where(jnp.arange(logits_BxV.shape[-1]) < self.valid_vocab, logits_BxV, -jnp.inf)

    def _step_state(self, nxt_B, pos_B, gen_B, done_B, eos):
        """Bookkeeping after sampling ``nxt`` (the token at position ``pos``) for the live sequences."""
        stop_B = nxt_B == eos  # eos -1: none
        emit_B = ~done_B & ~stop_B
        gen_B = gen_B + emit_B
        full_B = pos_B + 1 >= self.max_len  # no slot left to feed the new token into
        finish_B = jnp.where(stop_B, 1, jnp.where(gen_B >= self.max_new, 2, jnp.where(full_B, 3, 0)))
        done_B = done_B | (finish_B > 0)
        return emit_B, gen_B, done_B, finish_B

    def _prefill(self, params, tokens_BxP, lengths_B, seq_ids_B, active_B, eos):
        B = tokens_BxP.shape[0]
        model = nnx.merge(self.graphdef, self._empty_cache(B), params)
        _, aux = model(tokens_BxP, return_hidden=True)
        last_Bx1xD = jnp.take_along_axis(aux["hidden"][-1], (lengths_B - 1)[:, None, None], axis=1)
        logits_BxV = self._limit_vocab(model.head(last_Bx1xD)[:, 0])
        nxt_B = sample_tokens(logits_BxV, seq_ids_B, jnp.zeros_like(lengths_B), self.sampling)
        emit_B, gen_B, done_B, finish_B = self._step_state(nxt_B, lengths_B, jnp.zeros_like(lengths_B), ~active_B,
                                                           eos)
        state = {"last": nxt_B, "pos": lengths_B, "gen": gen_B, "done": done_B, "finish": finish_B}
        return nnx.state(model, nnx.Cache), state, jnp.where(emit_B, nxt_B, -1)

    def _decode(self, params, cache, state, seq_ids_B, eos, n_steps):
        """Up to ``n_steps`` decode steps (fewer once every sequence is done); returns the tokens emitted
        (B×chunk, -1 where none) and how many steps ran."""
        B = state["last"].shape[0]

        def cond(carry):
            t, _, s, _ = carry
            return (t < n_steps) & ~jnp.all(s["done"])

        def body(carry):
            t, cache, s, out_BxC = carry
            model = nnx.merge(self.graphdef, cache, params)
            logits_Bx1xV, _ = decode_logits(model, s["last"][:, None], s["pos"][:, None])
            logits_BxV = self._limit_vocab(logits_Bx1xV[:, 0])
            nxt_B = sample_tokens(logits_BxV, seq_ids_B, s["gen"], self.sampling)
            pos_B = s["pos"] + ~s["done"]  # the new token's position
            emit_B, gen_B, done_B, finish_B = self._step_state(nxt_B, pos_B, s["gen"], s["done"], eos)
            s = {"last": jnp.where(emit_B, nxt_B, s["last"]), "pos": jnp.where(emit_B, pos_B, s["pos"]),
                 "gen": gen_B, "done": done_B, "finish": jnp.where(s["done"], s["finish"], finish_B)}
            out_BxC = out_BxC.at[:, t].set(jnp.where(emit_B, nxt_B, -1))
            return t + 1, nnx.state(model, nnx.Cache), s, out_BxC

        out = jnp.full((B, self.chunk), -1, jnp.int32)
        t, cache, state, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), cache, state, out))
        return cache, state, out, t

    def _run(self, name, fn, donate, *args):
        """Runs ``fn`` compiled ahead of time once per input shapes; returns (outputs, seconds), outputs ready.
        Compilation is timed apart (``compile_s``), so the seconds are the computation's own."""
        key = (name,) + tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[1:]))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if key not in self._compiled:
                t0 = time.perf_counter()
                self._compiled[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
                self.compile_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            outs = jax.block_until_ready(self._compiled[key](*args))
        return outs, time.perf_counter() - t0

    # ---- the host side -------------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[Sequence[int]]):
        if len(prompts) == 0:
            raise UsageError("no prompts to generate from (a batch of zero)")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise UsageError(f"prompt {i} is empty")
            if len(p) >= self.max_len:
                raise UsageError(f"prompt {i} has {len(p)} tokens, the context holds {self.max_len}: "
                                 "a prompt must be shorter than the context")

    def generate(self, prompts: Sequence[Sequence[int]], eos_id: int | None = None,
                 seq_ids: Sequence[int] | None = None,
                 on_chunk: Callable[[list[list[int]]], None] | None = None) -> Result:
        """Continues every prompt (lists of token ids) until ``eos_id``, max_new_tokens or a full context.
        ``seq_ids`` (default 0..n-1) pick the random keys; ``on_chunk`` receives each prompt's new tokens so
        far after the prefill and after every decode chunk."""
        self.check_prompts(prompts)
        self.compile_s = 0.0
        n = len(prompts)
        seq_ids = list(range(n)) if seq_ids is None else list(seq_ids)
        B = -(-n // self.token_shards) * self.token_shards  # padding rows: one-token prompts, done from the start
        longest = max(len(p) for p in prompts)
        P_len = min(self.max_len, max(8, 1 << (longest - 1).bit_length()))  # few distinct shapes to compile
        tokens = np.zeros((B, P_len), np.int32)
        lengths = np.ones((B,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        ids = np.zeros((B,), np.int32)
        ids[:n] = seq_ids
        active = np.arange(B) < n
        args = [jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(ids), jnp.asarray(active)]
        if self.mesh is not None:
            args = [jax.device_put(a, self._spec("batch", *([None] * (a.ndim - 1)))) for a in args]
        out = [[] for _ in range(n)]

        def collect(tokens_BxC):
            for i, row in enumerate(np.asarray(tokens_BxC)[:n]):
                out[i].extend(int(x) for x in row if x >= 0)
            if on_chunk is not None:
                on_chunk(out)

        eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
        (cache, state, first), prefill_s = self._run("prefill", self._prefill, (), self.params, *args, eos)
        first = np.asarray(first)
        collect(first[:, None])
        decode_s, steps_left = 0.0, self.max_new - 1
        while steps_left > 0 and not bool(np.all(np.asarray(state["done"]))):
            n_steps = jnp.asarray(min(self.chunk, steps_left), jnp.int32)
            (cache, state, chunk_out, ran), seconds = self._run("decode", self._decode, (1, 2), self.params, cache,
                                                                 state, args[2], eos, n_steps)
            decode_s += seconds
            steps_left -= int(ran)
            collect(chunk_out)
        names = {1: "eos", 2: "length", 3: "context"}
        finish = [names.get(int(f), "length") for f in np.asarray(state["finish"])[:n]]
        new = sum(len(o) for o in out)
        first_tokens = int(np.sum(first[:n] >= 0))
        return Result(out, finish, int(sum(len(p) for p in prompts)), prefill_s, new - first_tokens, decode_s,
                      self.compile_s)


# ---- the command line ------------------------------------------------------------------------------------

def run_tokenizer(data_cfg, run_dir: str):
    """The tokenizer a run trained with, without reading its corpus."""
    from ultramem_jax.data import PREPARED_META
    from ultramem_jax.tokenizer import BPETokenizer, load_tokenizer

    spec = data_cfg.dataset.strip()
    if data_cfg.format == "prepared" or os.path.isfile(os.path.join(spec, PREPARED_META)):
        try:
            with open(os.path.join(spec, PREPARED_META)) as f:
                return load_tokenizer(os.path.join(spec, json.load(f)["tokenizer"]))
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"the run's prepared data {spec} is unreadable: {type(e).__name__}: {e}") from None
    if data_cfg.tokenizer == "bpe":
        path = os.path.join(run_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise UsageError(f"{path} not found: the run's BPE tokenizer is needed to encode prompts")
        return BPETokenizer.load(path)
    return load_tokenizer(data_cfg.tokenizer)


class _Stream:
    """Prints one prompt's continuation as it grows (holding back a possibly incomplete UTF-8 character)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.shown = tokenizer, out, 0

    def __call__(self, tokens: list[int], final: bool = False):
        text = self.tokenizer.decode(tokens)
        upto = len(text) if final or not text.endswith("\ufffd") else len(text) - 1
        if upto > self.shown:
            self.out.write(text[self.shown:upto])
            self.out.flush()
            self.shown = upto


def run_prompts(model, tokenizer, prompts: Sequence[str], *, context: int, max_new_tokens: int, sampling: Sampling,
                batch_size: int = 8, cache_dtype=None, chunk: int = 16, out=sys.stdout, err=sys.stderr) -> None:
    """Generates a continuation of every prompt, ``batch_size`` at a time.  One prompt is streamed as it is
    decoded; several are printed each with a header once their batch is done.  Ends with the speed line."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if chunk < 1:
        raise UsageError(f"chunk must be >= 1, got {chunk}")
    encoded = [[int(t) for t in tokenizer.encode(p)] for p in prompts]
    gen = Generator(model, context, max_new_tokens=max_new_tokens, sampling=sampling, cache_dtype=cache_dtype,
                    chunk=chunk, valid_vocab=tokenizer.vocab_size)
    gen.check_prompts(encoded)  # every prompt, before any is run
    totals = dict(prompt=0, prefill=0.0, decode_tokens=0, decode=0.0, compile=0.0, finish={})
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        stream = None
        if len(encoded) == 1:
            out.write(prompts[0])
            stream = _Stream(tokenizer, out)
        r = gen.generate(batch, eos_id=tokenizer.eos_id, seq_ids=range(start, start + len(batch)),
                         on_chunk=(lambda toks: stream(toks[0])) if stream else None)
        if stream:
            stream(r.tokens[0], final=True)
            out.write("\n")
        else:
            for i, new in enumerate(r.tokens):
                out.write(f"=== prompt {start + i} ({r.finish[i]}) ===\n{prompts[start + i]}"
                          f"{tokenizer.decode(new)}\n")
        out.flush()
        totals["prompt"] += r.prompt_tokens
        totals["prefill"] += r.prefill_s
        totals["decode_tokens"] += r.decode_tokens
        totals["decode"] += r.decode_s
        totals["compile"] += r.compile_s
        for f in r.finish:
            totals["finish"][f] = totals["finish"].get(f, 0) + 1
    stops = ", ".join(f"{n} {why}" for why, n in sorted(totals["finish"].items()))
    err.write(f"prefill {totals['prompt']:,} tokens at {totals['prompt'] / max(totals['prefill'], 1e-9):,.0f} tok/s"
              f" | decode {totals['decode_tokens']:,} tokens at "
              f"{totals['decode_tokens'] / max(totals['decode'], 1e-9):,.0f} tok/s | {len(encoded)} prompt(s), "
              f"batch {min(batch_size, len(encoded))}, context {context}, {gen.cache_dtype} cache | stopped: {stops}"
              f" | compile {totals['compile']:.1f} s (not in the rates)\n")
    err.flush()


def read_prompts(args) -> list[str]:
    if (args.prompt is None) == (args.prompts_file is None):
        raise UsageError("give exactly one of --prompt TEXT and --prompts-file FILE")
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompts_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts-file {args.prompts_file}: {type(e).__name__}: {e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {args.prompts_file} holds no prompts (one per line)")
    return prompts


def main(argv=None) -> int:
    skip_absent_tpu()
    p = argparse.ArgumentParser(prog="python -m ultramem_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the output_dir of a training run")
    p.add_argument("--prompt", default=None, help="continue this text (streamed)")
    p.add_argument("--prompts-file", default=None, help="a file of prompts, one per line (blank lines skipped)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence, prompt included (default: the run's seq_len)")
    p.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                   help="KV cache dtype (default: the model's activation dtype)")
    p.add_argument("--chunk", type=int, default=16, help="decode steps per on-device loop between prints")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
    args, rest = p.parse_known_args(argv)
    try:
        prompts = read_prompts(args)
        from ultramem_jax.eval import load_run  # eval's --prompt comes here, so import it late

        cfg, model, _, _, _ = load_run(args.run_dir, args.step, rest, devices=jax.devices()[:1])
        sampling = Sampling(args.temperature, args.top_k, args.top_p, cfg.seed if args.seed is None else args.seed)
        run_prompts(model, run_tokenizer(cfg.data, args.run_dir), prompts, context=args.context or cfg.seq_len,
                    max_new_tokens=args.max_new_tokens, sampling=sampling, batch_size=args.batch_size,
                    cache_dtype=args.cache_dtype, chunk=args.chunk)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
