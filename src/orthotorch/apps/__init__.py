"""Applications built on the library: the ``orthotorch`` command, demos and experiment drivers.

Nothing in the library packages imports from here; benchmarks, examples and the command line do.

- :mod:`orthotorch.apps.cli`: the ``orthotorch`` command and its explicit subcommand table.
- :mod:`orthotorch.apps.demo`: ``orthotorch demo``, the copying task with three recurrent models.
- :mod:`orthotorch.apps.procrustes`: ``orthotorch demo procrustes``, recover a hidden rotation.
- :mod:`orthotorch.apps.rnn`: ``orthotorch rnn train | eval | plot``, orthogonal RNNs on long-memory tasks.
- :mod:`orthotorch.apps.attention_lm`: ``orthotorch attention``, a small causal Performer LM.
- :mod:`orthotorch.apps.bilevel`: ``orthotorch bilevel``, few-shot digits, sinusoids, the FOM counterexample.
- :mod:`orthotorch.apps.humanoid`: ``orthotorch humanoid``, evolution strategies on Gymnasium MuJoCo.
"""
