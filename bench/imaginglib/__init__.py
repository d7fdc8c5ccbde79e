"""bench/run-imaging-bench: make and restore of a disk image through imgsrvd vs
partclone | zstd | TCP."""
