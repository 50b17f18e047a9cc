"""skip_absent_tpu: which hosts get JAX_PLATFORMS=cpu (libtpu installed for the TPU compile tests, no TPU)."""
import importlib.util

import pytest

from ultramem_jax import platforms


@pytest.mark.parametrize("env,libtpu,cuda,tpu_host,want", [
    ({}, True, False, False, ["cpu"]),          # the dev extra on a CPU machine: quiet CPU
    ({}, False, False, False, []),              # no libtpu: jax's own choice
    ({}, True, True, False, []),                # a GPU host: jax's own choice
    ({}, True, False, True, []),                # a TPU host
    ({"JAX_PLATFORMS": "tpu"}, True, False, False, []),  # the user's setting wins
])
def test_skip_absent_tpu_only_where_libtpu_has_no_tpu(monkeypatch, env, libtpu, cuda, tpu_host, want):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    real = importlib.util.find_spec
    present = {"libtpu": libtpu, "jax_cuda13_plugin": cuda, "jax_cuda12_plugin": False}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real("os") if present[name] else None) if name in present else real(name, *a))
    monkeypatch.setattr(platforms, "_tpu_host", lambda: tpu_host)
    calls = []
    monkeypatch.setattr(platforms.jax.config, "update", lambda key, value: calls.append((key, value)))
    platforms.skip_absent_tpu()
    assert calls == [("jax_platforms", p) for p in want]
