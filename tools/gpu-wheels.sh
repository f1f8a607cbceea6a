#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels the lent GPU machine lacks for the GPU suite. That machine
# has torch, triton and transformers but no network; these are pure-Python wheels:
#   platformdirs     flashtune's default cache dir (without it the dir follows $XDG_CACHE_HOME)
#   torchtitan 0.3.0 its released MoE layer, timed in the suite's MoE section, with what that
#                    layer imports: spmd_types 0.2.3 (pinned by torchtitan), tyro and tyro's
#                    docstring-parser and typeguard
#
#   tools/gpu-wheels.sh          # then carry .whl in the device run, which starts with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Checked on 2026-12-07: with only torch, triton 3.6 and transformers installed, these six make
# tests/moe_spellings.py's TorchtitanRelease build and run.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    platformdirs==4.14.9 torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
ls -1 .whl
du -sh .whl
