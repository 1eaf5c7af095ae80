#!/usr/bin/env bash
# The README's test command: set up, then run the default (fast) test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
python -m pytest -q "$@"
