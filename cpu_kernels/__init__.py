"""The memory layers' hot ops as native CPU kernels (C++ through XLA's FFI), forward and backward.

Same signatures and results as the XLA reference ops they replace, which stay the oracle and the fallback:

  gather_pool.gather_pool  ``ultramem_jax.ive.gather_pool``      (gather_pool.cc)
  key_search.search        ``ultramem_jax.key_search.search``    (rescore.cc: the winners' scores and their
                                                                  gradient; the selection stays XLA's)

Why hand-written code: XLA's CPU backend runs these ops as chains of gathers, transposing copies, tiny batched
matmuls and scatters, one pass over memory each; on tiny-x12 they were about 40% of a train step
(docs/results.md §3.1), where the C++ loops read each selected row once. Pallas has no CPU compiler (only
interpret mode) and no library offers an IVE gather-pool, so they are written here, against the FFI headers
jaxlib ships. ``build.py`` compiles them on first use with the host's C++ compiler; ``memory.kernels: auto``
takes them on CPU when that works and XLA otherwise (kernels.py).
"""
