"""The memory layers' hot ops as native CPU kernels (C++ through XLA's FFI), forward and backward.

Same signatures and results as the XLA reference ops they replace, which stay the oracle and the fallback:

  gather_pool.gather_pool  ``ultramem_jax.ive.gather_pool``      (gather_pool.cc)
  key_search.search        ``ultramem_jax.key_search.search``    (select.cc: the winners, no gradient;
                                                                  rescore.cc: their scores and gradient)
  key_search.select        ``ultramem_jax.key_search.select``
  key_search.rescore       ``ultramem_jax.key_search.rescore``

Why hand-written code: XLA's CPU backend runs these ops as chains of gathers, transposing copies, tiny batched
matmuls, sorting networks and scatters, one pass over memory each; on tiny-x12 they were about 40% of a train
step (docs/results.md §3.1), where the C++ loops read each selected row and key once. Pallas has no CPU compiler (only
interpret mode) and no library offers an IVE gather-pool, so they are written here, against the FFI headers
jaxlib ships. ``build.py`` compiles them on first use with the host's C++ compiler; ``memory.kernels: auto``
takes them on CPU when that works and XLA otherwise (kernels.py).
"""
