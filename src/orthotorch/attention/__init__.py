"""FAVOR+ attention, causal prefix-sum attention and SLiM training. Not implemented yet (issue 5)."""
