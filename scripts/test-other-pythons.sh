#!/usr/bin/env bash
# The event loop's tests on the other Pythons this machine has (3.12, 3.13, ...).
#
# aem.EventLoop is asyncio's selector loop with parts replaced, and asyncio's internals
# change between Python versions (3.12 made a transport's write buffer a deque, and an
# asyncio.Handle's weak references "managed"): what `make test` runs on the default
# Python is run here on each other one found, in a venv of its own (.venv-3.X), over the
# loop's test files and CPython's own test.test_asyncio of that version bound to the loop
# (tests/test_conformance.py).  A version not installed is reported and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # find_python 3.12 -> a working interpreter of that version, or nothing
    local v=$1 p
    if p=$(command -v "python$v") && "$p" -V >/dev/null 2>&1; then
        echo "$p"
        return
    fi
    for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python3; do
        if [ -x "$p" ] && "$p" -V >/dev/null 2>&1; then
            echo "$p"
            return
        fi
    done
}

status=0
for v in 3.12 3.13; do
    py=$(find_python "$v")
    if [ -z "$py" ]; then
        echo "test-other-pythons: Python $v is not installed here: skipped"
        continue
    fi
    venv=".venv-$v"
    # a venv that cannot be made or filled (no ensurepip, a dependency with no wheel and no
    # way to build it) is this machine's limit, not a failure of aem's tests: said, skipped
    if ! { [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"; } \
        || ! "$venv/bin/python" -m pip install --quiet --upgrade pip \
        || ! "$venv/bin/python" -m pip install --quiet '.[test]'; then
        echo "test-other-pythons: Python $v: could not install aem and its test extra in $venv: SKIPPED"
        continue
    fi
    files=(test_loop.py test_loop_streams.py test_loop_apps.py)
    what="the loop's tests"
    if "$venv/bin/python" -c "import test.test_asyncio" 2>/dev/null; then
        files+=(test_conformance.py)
        what+=", test.test_asyncio"
    else
        what+=" (no test.test_asyncio in this Python: the conformance run is skipped)"
    fi
    echo "test-other-pythons: Python $("$venv/bin/python" -V 2>&1 | cut -d' ' -f2): $what"
    (cd tests && timeout 900 "../$venv/bin/python" -m pytest -q -p no:cacheprovider "${files[@]}") || status=1
done
exit $status
