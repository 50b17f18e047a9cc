"""ultramem-jax: UltraMem ultra-sparse memory layers (arXiv 2411.12364) in JAX / Flax NNX."""
from ultramem_jax.config import MemoryConfig, ModelConfig
from ultramem_jax.memory import PKMLayer, UltraMemLayer
from ultramem_jax.transformer import TransformerLM, create_model, lm_loss

__all__ = ["MemoryConfig", "ModelConfig", "PKMLayer", "UltraMemLayer", "TransformerLM", "create_model", "lm_loss"]
__version__ = "0.1.0"
