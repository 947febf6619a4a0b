"""Exact (constant-memory), FOM and UFOM hypergradients. Not implemented yet (issue 6)."""
