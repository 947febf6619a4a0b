"""Stochastic Givens-rotation optimizers (OrthogonalSGD, OrthogonalAdam). Not implemented yet (issue 4)."""
