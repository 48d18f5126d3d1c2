#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv on first use (or when pyproject.toml
# changes), then runs the main job or the tests.
#   bash run.sh demo [args]   - the end-to-end demo (`vif demo`)
#   bash run.sh test [args]   - the test suite (pytest)
set -euo pipefail
cd "$(dirname "$0")"
# The stamp changes with pyproject.toml and with this script's install steps.
stamp=".venv/.installed-$(cat pyproject.toml run.sh | sha1sum | cut -c1-12)${VIF_EXTRAS:+-$VIF_EXTRAS}"
if [ ! -f "$stamp" ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    # The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/pip install -q "torch==2.13.0"
    .venv/bin/pip install -q -e ".[dev${VIF_EXTRAS:+,$VIF_EXTRAS}]"
    # lmms-eval (for the plug-in tests) WITHOUT its ~140 requirements, which include a
    # torchvision that breaks the CPU torch; what it needs is the [lmms] extra, part of [dev].
    .venv/bin/pip install -q --no-deps "lmms-eval==0.7.3"
    # DeepSpeed, for the ZeRO-2 / ZeRO-3 tests on CPU processes (not a dependency of vif). Its
    # setup.py imports torch, so it is built against the torch above (--no-build-isolation);
    # DS_BUILD_OPS=0 compiles no C++ op. About 25 s.
    .venv/bin/pip install -q setuptools wheel
    DS_BUILD_OPS=0 .venv/bin/pip install -q --no-build-isolation "deepspeed==0.19.8"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
command="${1:-test}"
shift || true
case "$command" in
    demo) exec .venv/bin/vif demo "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    *) echo "usage: bash run.sh demo|test [args]" >&2; exit 2 ;;
esac
