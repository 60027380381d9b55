"""pkmlm: language models with product-key memory layers."""

# The model needs torch only: a bare PyTorch machine can `import pkmlm` and benchmark it.
from pkmlm.model import MemoryConfig, ModelConfig, ProductKeyMemory, Transformer

__all__ = ["MemoryConfig", "ModelConfig", "ProductKeyMemory", "Transformer"]
from pkmlm.run import Run, generate, load_run  # noqa: E402  (torch + tokenizers, imported lazily inside)

__all__ += ["Run", "generate", "load_run"]
