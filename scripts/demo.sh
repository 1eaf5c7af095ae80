#!/usr/bin/env bash
# The README's demo command: set up, then generate from the embedded world model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
erasekit generate "a crimson star on a grass background" -n 8 --seed 0 -o demo-grid.png "$@"
