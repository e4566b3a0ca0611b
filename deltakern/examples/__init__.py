"""Runnable examples: `python -m deltakern.examples.<name>` (see each module's docstring)."""
