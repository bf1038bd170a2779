"""One module per command: each takes a :class:`~basins.engine.problem.Problem` and returns a result.

See the README's "Architecture" section for where to add a new analysis.
"""
