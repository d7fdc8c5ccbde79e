"""The `preboot-dir` program, the administrator's tool for the directory: `python -m
common.dircli` or `preboot-dir` (the program is __main__.py). A program, not a library:
nothing imports it.

May import: the foundation, common.daemon, common.policy and common.imaging (`images` reads
image headers).
"""
