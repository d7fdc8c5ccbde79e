"""Helpers for bench/run-proxydhcp-bench: namespaces, the DISCOVER load generator, the servers,
the report.

Nothing here is imported by the daemons; it is the benchmark's own code.
"""
