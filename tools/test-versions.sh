#!/usr/bin/env bash
# Run the test suite under every supported torch, each in its own virtual environment:
#
#   tools/test-versions.sh               # torch 2.11.0, 2.13.0 (the pin) and 2.14.1
#   tools/test-versions.sh 2.14.1        # only these versions
#
# Each version's venv is .venvs/torch-<version> (made once, reused), its log .venvs/torch-<version>.log.
# Prints one pytest summary line per version; exits 1 if any version's suite failed.
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL pick where torch comes from (pip's own variables).
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(2.11.0 2.13.0 2.14.1)
mkdir -p .venvs
status=0
for v in "${versions[@]}"; do
    venv=".venvs/torch-$v"
    log=".venvs/torch-$v.log"
    echo "== torch $v: $venv (log: $log)"
    if ! { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } >"$log" 2>&1 \
        || ! "$venv/bin/pip" install "torch==$v" -e ".[test]" >>"$log" 2>&1; then
        echo "torch $v: install failed (see $log)"
        status=1
        continue
    fi
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests >>"$log" 2>&1
    rc=$?
    echo "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'): $(tail -n 1 "$log")"
    [ $rc -eq 0 ] || status=1
done
exit $status
