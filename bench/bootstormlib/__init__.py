"""bench/run-bootstorm-bench: N simulated PXE/iPXE clients against our stack and a peer stack."""
