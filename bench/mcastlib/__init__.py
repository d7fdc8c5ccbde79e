"""bench/run-multicast-bench: multicast imaging peers (udpcast, UFTP, later ours) in a lab of
network namespaces (tests/mcastlab.py): `peers.py` the peers, `runner.py` cases and report."""
