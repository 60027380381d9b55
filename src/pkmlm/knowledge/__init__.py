"""Knowledge-capacity experiments: a synthetic biography corpus (`facts`) whose stored bits
`pkmlm.metrics.recall` measures."""
