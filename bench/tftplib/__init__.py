"""Helpers for bench/run-tftp-bench: start TFTP servers, run clients, probe options, report.

Nothing here is imported by the daemons; it is the benchmark's own code.
"""
