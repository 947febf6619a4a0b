"""``orthotorch bilevel``: tasks (few-shot digits, sinusoids), experiment drivers and the command."""
