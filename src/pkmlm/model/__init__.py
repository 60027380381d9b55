"""The model: product-key memory layers and the transformer that hosts them (torch only)."""

from pkmlm.model.memory import MemoryConfig, ProductKeyMemory
from pkmlm.model.transformer import ModelConfig, Transformer

__all__ = ["MemoryConfig", "ModelConfig", "ProductKeyMemory", "Transformer"]
