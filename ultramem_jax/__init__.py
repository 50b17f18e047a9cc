"""ultramem-jax: UltraMem ultra-sparse memory layers (arXiv 2411.12364) in JAX / Flax NNX."""
from ultramem_jax.platforms import skip_absent_tpu

# Library users too: with the dev extra (libtpu, for the TPU compile tests) on a machine without a TPU, jax
# would otherwise probe for one at its first computation and print libtpu errors.  A no-op when JAX_PLATFORMS is
# set, on TPU and GPU hosts, and without libtpu; before jax's first computation, as importing this package is.
skip_absent_tpu()

from ultramem_jax.config import MemoryConfig, ModelConfig
from ultramem_jax.memory import PKMLayer, UltraMemLayer
from ultramem_jax.memory_plus import MemoryPlusLayer
from ultramem_jax.memory_v2 import SharedValueTable, UltraMemV2Layer
from ultramem_jax.transformer import TransformerLM, create_model, lm_loss

__all__ = ["MemoryConfig", "ModelConfig", "PKMLayer", "UltraMemLayer", "UltraMemV2Layer", "MemoryPlusLayer",
           "SharedValueTable", "TransformerLM", "create_model", "lm_loss"]
__version__ = "0.1.0"
