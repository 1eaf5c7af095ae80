#!/usr/bin/env bash
# The README's demo command: set up, then erase a concept from the embedded world with UCE,
# evaluate before/after on the same seeds and write erasekit-demo/report.html.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
erasekit demo --overwrite "$@"   # replaces only a run folder erasekit wrote itself
