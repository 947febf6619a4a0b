"""Humanoid experiments with orthogonal world models and ES. Not implemented yet (a later issue).

Needs the optional extra ``rl`` (gymnasium with MuJoCo).
"""
