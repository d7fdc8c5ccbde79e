#!/bin/bash
# Run every test: installs what the tests need, then pytest. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not e2e"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec python3 -m pytest "$@"
