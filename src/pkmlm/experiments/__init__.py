"""Experiments: sweep naming (one directory and one wandb group per sweep), reading finished runs
back, and the comparison report behind `pkmlm-compare`. The presets themselves are YAML files in
`configs/experiment/` (families `tiny/`, `small/`, `paper/`; `compare/` and `sweep/` groups)."""
