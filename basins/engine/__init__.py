"""The exact full-data problem: parameters, data sources, losses, HVP routes, processes, memory.

Imports only :mod:`basins.linalg` and :mod:`basins.errors`; see the README's "Architecture" section.
"""
