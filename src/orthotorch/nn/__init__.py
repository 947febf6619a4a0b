"""Orthogonal RNN cells and constrained layers. Not implemented yet (a later issue)."""
