#!/usr/bin/env bash
# Create or reuse .venv and install erasekit with what it needs. Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "erasekit: creating $venv" >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.erasekit-installed"
want="$( (cat "$root/pyproject.toml" "$root/scripts/setup.sh"; echo "${ERASEKIT_TORCH_INDEX:-}") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "erasekit: installing dependencies into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build. PyPI's Linux torch==2.13.0 is the
  # CUDA build too; where pip's index has no CPU build, ERASEKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
  # takes it from PyTorch's own index.
  # (with it, torch is reinstalled from there even when a CUDA build of the same version is in the venv)
  "$venv/bin/python" -m pip install -q "torch==2.13.0" \
    ${ERASEKIT_TORCH_INDEX:+--index-url "$ERASEKIT_TORCH_INDEX" --force-reinstall}
  "$venv/bin/python" -m pip install -q -e "$root[test]"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
