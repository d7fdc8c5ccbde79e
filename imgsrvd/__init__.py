"""Imaging server daemon: image store, auto-imaging, referrals, results log, statistics, multicast."""
