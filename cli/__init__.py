"""The ``basins`` command line (installed as ``basins.cli``): a thin adapter over the library.

It parses options, calls one library function per command, and formats the result:
data to stdout (a rich table, or one JSON object with ``--json``), progress and logs to
stderr. It never does math.
"""
