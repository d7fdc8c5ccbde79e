"""Daemon plumbing shared by every daemon (and read by zmgmcast): the config syntax
(config.py), the one lifecycle path (runner.py: pidfile.py, logsetup.py, sdnotify.py,
statussock.py), the TCP listener and worker pool (tcplisten.py, workerpool.py), the aiohttp
daemon plumbing (httpdaemon.py), the registry of services (services.py) and the counters
snapshot (counters.py).

May import: the foundation (common.errors, common.fileio, common.machine) only; no other wing,
no daemon.
"""
