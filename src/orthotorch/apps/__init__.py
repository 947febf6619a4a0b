"""Applications built on the library: the ``orthotorch`` command, demos and experiment drivers.

Nothing in the library packages imports from here; benchmarks, examples and the command line do.

- :mod:`orthotorch.apps.cli`: the ``orthotorch`` command and its explicit subcommand table.
- :mod:`orthotorch.apps.procrustes`: ``orthotorch demo procrustes``, recover a hidden rotation.
- :mod:`orthotorch.apps.attention_lm`: ``orthotorch attention``, a small causal Performer LM.
- :mod:`orthotorch.apps.bilevel`: ``orthotorch bilevel``, few-shot digits, sinusoids, the FOM counterexample.
"""
