"""Thin command-line entry points (Hydra apps and plain CLIs)."""
