"""KV-cache generation: cached logits against full recompute, batches against single prompts, sharded
against one device, EOS, and bad input."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import PartitionSpec as P

from ultramem_jax import MemoryConfig, ModelConfig, create_model
from ultramem_jax.config import MoEConfig
from ultramem_jax.errors import UsageError
from ultramem_jax.generate import Generator, Sampling, decode_logits, filter_logits
from ultramem_jax.mesh import logical_rules, make_mesh, memory_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4)
MODELS = {
    "dense": {},
    "ultramem": dict(memory=MemoryConfig(num_keys=8, key_dim=8, value_dim=16, topk=4), memory_placement="0:1"),
    "pkm": dict(memory=MemoryConfig.pkm(num_keys=8, topk=4), memory_placement="1:1"),
    "moe": dict(moe=MoEConfig(num_experts=4, expert_mlp_dim=32)),
}
# f32: the cached path attends over L cache slots (masked) where the full forward attends over S keys, so only
# the order of the softmax's sums differs
TOL = dict(rtol=1e-5, atol=1e-5)


_BUILT = {}


def _model(kind):
    """One model per kind for the whole module (building and compiling dominate this file's run time; the
    inputs are fresh in every test)."""
    if kind not in _BUILT:
        _BUILT[kind] = _widen(create_model(ModelConfig(**TINY, **MODELS[kind]), seed=list(MODELS).index(kind)))
    return _BUILT[kind]


def _widen(model):
    """Untrained logits sit within ±0.5 of each other; widened, greedy choices are far from ties."""
    model.unembed[...] = model.unembed[...] * 30
    return model


_FULL = {}


def _full_logits(model, tokens):
    """The oracle: one forward pass over the whole sequence, no cache."""
    if id(model) not in _FULL:
        graphdef = nnx.graphdef(model)
        _FULL[id(model)] = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])
    return np.asarray(_FULL[id(model)](nnx.state(model), tokens))


_FORCED = {}
PREFILL = 8  # prefill width of _teacher_forced: one compiled shape


def _teacher_forced(gen, tokens_BxT, prompt_lens):
    """Logits B×T×V of ``tokens`` through the cache: a prefill of each row's first prompt_lens[b] tokens
    (right-padded), then one token per step at each row's own position."""
    B, T = tokens_BxT.shape
    key = (id(gen.graphdef), B, str(gen.cache_dtype), gen.max_len)
    if key not in _FORCED:
        def prefill(params, tokens):
            model = nnx.merge(gen.graphdef, gen._empty_cache(B), params)
            logits, _ = model(tokens)
            return logits, nnx.state(model, nnx.Cache)

        def step(params, cache, tok_Bx1, pos_Bx1):
            model = nnx.merge(gen.graphdef, cache, params)
            logits, _ = decode_logits(model, tok_Bx1, pos_Bx1)
            return logits[:, 0], nnx.state(model, nnx.Cache)

        _FORCED[key] = jax.jit(prefill), jax.jit(step)
    prefill, step = _FORCED[key]
    logits, cache = prefill(gen.params, tokens_BxT[:, :PREFILL])
    got = np.full((B, T, logits.shape[-1]), np.nan, np.float32)
    for b, p in enumerate(prompt_lens):
        got[b, :p] = logits[b, :p]
    for j in range(T - min(prompt_lens)):
        pos = np.minimum(np.asarray(prompt_lens) + j, T - 1)  # a row at its end repeats its last position
        tok = np.take_along_axis(np.asarray(tokens_BxT), pos[:, None], axis=1)
        out, cache = step(gen.params, cache, jnp.asarray(tok), jnp.asarray(pos[:, None]))
        for b, p in enumerate(prompt_lens):
            if p + j < T:
                got[b, p + j] = out[b]
    return got


_GENERATORS = {}


def _generator(kind, max_len=16, **kw):
    key = (kind, max_len, tuple(sorted(kw.items())))
    if key not in _GENERATORS:
        _GENERATORS[key] = Generator(_model(kind), max_len, **kw)
    return _GENERATORS[key]


@pytest.mark.parametrize("kind", list(MODELS))
def test_cached_logits_equal_full_recompute_at_every_position(rng, kind):
    tokens = jnp.asarray(rng.integers(0, 64, (2, 14)), jnp.int32)
    want = _full_logits(_model(kind), tokens)
    prompt_lens = [int(rng.integers(1, 5)), int(rng.integers(5, PREFILL + 1))]  # rows decode from different positions
    got = _teacher_forced(_generator(kind), tokens, prompt_lens)
    np.testing.assert_allclose(got, want, **TOL)


def test_bfloat16_cache_stays_close_to_full_recompute(rng):
    tokens = jnp.asarray(rng.integers(0, 64, (2, 14)), jnp.int32)
    want = _full_logits(_model("dense"), tokens)
    got = _teacher_forced(_generator("dense", cache_dtype="bfloat16"), tokens, [3, 5])
    # bf16 keeps 8 bits of mantissa: cached keys and values are rounded by up to 0.4%, so the decoded
    # logits (spread over ±15) move by a little, and only they: the prefill attends in f32
    err = np.abs(got - want)
    assert 0 < err[:, 5:].max() < 0.05 * np.abs(want).max()
    np.testing.assert_allclose(got[:, :3], want[:, :3], **TOL)


SAMPLED = dict(max_new_tokens=10, sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=5), chunk=4)


def _mixed_prompts(rng):
    return [list(rng.integers(0, 64, n)) for n in (1, rng.integers(2, 5), rng.integers(5, 8), rng.integers(8, 12))]


def test_batch_of_mixed_lengths_equals_one_prompt_at_a_time_and_seed_fixes_text(rng):
    prompts = _mixed_prompts(rng)
    gen = _generator("ultramem", 24, **SAMPLED)
    batch = gen.generate(prompts)
    assert [len(t) for t in batch.tokens] == [10] * 4 and batch.finish == ["length"] * 4
    for i, p in enumerate(prompts):
        assert gen.generate([p], seq_ids=[i]).tokens[0] == batch.tokens[i]
    assert gen.generate(prompts[::-1], seq_ids=[3, 2, 1, 0]).tokens == batch.tokens[::-1]
    assert batch.tokens[0] != batch.tokens[1]  # different prompts and keys: different text


def test_greedy_decode_loop_is_the_argmax_of_full_recompute_and_stops_at_eos_and_context(rng):
    """The decode loop (while_loop, in chunks) against a host loop that recomputes the whole sequence per
    token, as eval's sampler used to."""
    model = _model("moe")
    prompts = [list(rng.integers(0, 64, n)) for n in (2, 13)]
    gen = _generator("moe", max_new_tokens=6, sampling=Sampling(temperature=0), chunk=4)
    free = gen.generate(prompts)
    # the 16-slot context leaves room for 3 new tokens after the 13-token prompt
    assert [len(t) for t in free.tokens] == [6, 3] and free.finish == ["length", "context"]
    forward = jax.jit(lambda t, n: model(t)[0][0, n - 1])
    for p, new in zip(prompts, free.tokens):
        seq = list(p)
        while len(seq) < min(16, len(p) + 6):
            window = np.zeros((1, 16), np.int32)  # one shape: padding after the sequence is never attended
            window[0, :len(seq)] = seq
            seq.append(int(jnp.argmax(forward(jnp.asarray(window), len(seq)))))
        assert new == seq[len(p):]
    eos = free.tokens[0][3]
    stopped = gen.generate(prompts, eos_id=eos)
    for new, full in zip(stopped.tokens, free.tokens):
        assert new == (full[:full.index(eos)] if eos in full else full)
    assert stopped.finish[0] == "eos"


def test_top_k_and_top_p_filters(rng):
    logits = jnp.asarray(rng.standard_normal((3, 50)), jnp.float32)
    kept = np.isfinite(np.asarray(filter_logits(logits, 5, 1.0)))
    assert (kept.sum(1) == 5).all()
    assert (kept == (np.asarray(logits) >= np.sort(np.asarray(logits), 1)[:, -5:-4])).all()
    p = 0.7
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, p)))
    for row, k in zip(np.asarray(logits), kept):  # brute force: the fewest top tokens whose mass reaches p
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        order = np.argsort(-probs)
        n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        assert set(np.flatnonzero(k)) == set(order[:n])


def _place(model, mesh, rules, layout):
    """``model``'s weights placed on ``mesh`` as the logical ``rules`` say, its memories looking up by ``layout``."""
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(state, mesh)
    placed = nnx.merge(graphdef, jax.tree.map(jax.device_put, state, shardings))
    for memory in placed.memories:
        memory.layout = layout
    return placed


def _layout(name):
    with open(os.path.join(ROOT, "configs", "sharding", f"{name}.yml")) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", ["dimension_wise", "number_wise", "hybrid", "replicated"])
def test_sharded_generation_equals_one_device(rng, name):
    layout_file = _layout(name)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    rules = logical_rules(layout_file["logical_axis_rules"], mesh)
    single = _model("ultramem")
    layout, rules = memory_layout(layout_file["memory_layout"], mesh, rules, single.cfg, batch_size=4)
    sharded = _place(single, mesh, rules, layout)
    values = sharded.memories[0].values[...]
    np.testing.assert_array_equal(np.asarray(values), np.asarray(single.memories[0].values[...]))
    assert values.sharding.spec == P(*[dict(rules)[a] for a in ("value_rows", "value_dim")])
    prompts = _mixed_prompts(rng)
    want = _generator("ultramem", 24, **SAMPLED).generate(prompts)
    # three prompts, padded to 4 rows for the 2 token shards; a batch's text does not depend on its other rows
    got = Generator(sharded, 24, mesh=mesh, rules=rules, **SAMPLED).generate(prompts[:3])
    assert got.tokens == want.tokens[:3]


@pytest.mark.parametrize("prompts,message", [
    ([], "no prompts"),
    ([[1, 2], []], "prompt 1 is empty"),
    ([list(range(16))], "prompt 0 has 16 tokens, the context holds 16"),
    ([[1], list(range(20))], "prompt 1 has 20 tokens"),
])
def test_bad_prompts_get_one_clear_error(prompts, message):
    gen = _generator("dense")
    with pytest.raises(UsageError, match=message):
        gen.generate(prompts)


@pytest.mark.parametrize("kw,message", [
    (dict(sampling=Sampling(temperature=-1)), "temperature"), (dict(sampling=Sampling(top_p=0)), "top-p"),
    (dict(sampling=Sampling(top_k=-2)), "top-k"), (dict(max_new_tokens=0), "max-new-tokens"),
    (dict(cache_dtype="float16"), "cache dtype"),
])
def test_bad_settings_get_one_clear_error(kw, message):
    with pytest.raises(UsageError, match=message):
        Generator(_model("dense"), 16, **kw)
