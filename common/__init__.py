"""Shared library of the Preboot Services daemons: config, lifecycle, logging, status."""

__version__ = "0.1.0"
