"""pkmlm: language models with product-key memory layers."""
