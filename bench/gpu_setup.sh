#!/usr/bin/env bash
# The packages the H200 image lacks (jmp, bitsandbytes, torchao), as wheels in ./.whl.
#
#   bash bench/gpu_setup.sh fetch     # here, with network: download the wheels (44 MB) into .whl/
#   bash bench/gpu_setup.sh install   # on the GPU machine (no network): install them into /tmp/site
#
# The GPU run then needs PYTHONPATH=/tmp/site:$PWD (bench/gpu_run.py's docstring has the command;
# pass ".whl" in the device tool's carry list so the wheels travel with the working tree).
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
case "${1:-install}" in
  fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
      jmp==0.0.4 bitsandbytes==0.50.2 torchao==0.18.0
    ls -la .whl
    ;;
  install)
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
      echo "installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    else
      echo "no .whl/*.whl here: rows needing bitsandbytes / jmp record 'unavailable'" >&2
    fi
    ;;
  *)
    echo "usage: $0 fetch|install" >&2
    exit 2
    ;;
esac
