#!/usr/bin/env bash
# `make test-matrix`: srigl under the other Pythons of the README's support matrix (3.12 and 3.13), which
# `make test` (3.11, every CI run) does not cover. Not part of .ci/run: each Python costs a ~1.4 GB download
# and a 5.4 GB virtualenv (PyPI has only the CUDA torch for them) plus a full suite; results/support_matrix.md
# has the numbers. For each Python in MATRIX_PYTHONS, in a fresh virtualenv .venv-matrix/pyX.Y:
#   1. pip install torch==$MATRIX_TORCH (timed, sized);
#   2. build the srigl wheel, install it with its core dependencies only, run tests/wheel_smoke.py;
#   3. pip install -e '.[test]' (timed), run pytest -n 2 on $MATRIX_TESTS (tests/test_wheel.py deselected:
#      step 2 is its check here, and it would install a second CUDA torch);
#   4. write that Python's section of $MATRIX_OUT (the other sections are kept) and delete the virtualenv
#      (MATRIX_KEEP=1 keeps it).
# A Python that is not installed is skipped with one printed line; any failure makes the exit status 1.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHONS=${MATRIX_PYTHONS:-"3.12 3.13"}
TORCH=${MATRIX_TORCH:-2.13.0}
TESTS=${MATRIX_TESTS:-tests}
OUT=${MATRIX_OUT:-results/support_matrix.md}
KEEP=${MATRIX_KEEP:-0}
DATA=${SRIGL_DATA_DIR:-data}
ROOT=$(pwd)
status=0

# The newest pyenv build of X.Y, else pythonX.Y on PATH; a candidate counts only if it runs and says X.Y (a
# pyenv shim for a version that is not selected exits 127 with "command not found").
find_python() {
    local version=$1 candidate
    for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".* 2>/dev/null | sort -V -r) \
        "$(command -v "python$version" 2>/dev/null)"; do
        candidate=${candidate%/}
        [ -d "$candidate" ] && candidate="$candidate/bin/python"
        [ -x "$candidate" ] || continue
        if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$version" ]; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

# Replaces (or appends) the block between <!-- pyX.Y --> and <!-- /pyX.Y --> in $OUT with the file $2.
write_section() {
    local version=$1 body=$2
    [ -f "$OUT" ] || printf '%s\n' "# Support matrix: srigl under Python 3.12 and 3.13" "" \
        "Written by \`make test-matrix\` (.ci/test_matrix.sh), one section per Python; Python 3.11 is tested by" \
        "every CI run (\`make test\`). Times are wall-clock on a 2-core machine shared with other jobs: noisy." \
        "Downloads come from PyPI (no pip cache on this machine), so install times depend on the network." > "$OUT"
    python3 - "$OUT" "$version" "$body" <<'EOF'
import re, sys
out, version, body = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip()
text = open(out).read()
block = f"<!-- py{version} -->\n{body}\n<!-- /py{version} -->"
pattern = re.compile(rf"<!-- py{re.escape(version)} -->.*?<!-- /py{re.escape(version)} -->", re.S)
text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
open(out, "w").write(text)
EOF
}

for version in $PYTHONS; do
    if ! python=$(find_python "$version"); then
        echo "test-matrix: Python $version not found (no python$version on PATH, no pyenv build): skipped"
        continue
    fi
    venv=".venv-matrix/py$version"
    log="$ROOT/.venv-matrix/py$version.log"
    body="$ROOT/.venv-matrix/py$version.md"
    echo "== test-matrix: $($python --version) ($python), torch==$TORCH"
    rm -rf "$venv" && mkdir -p .venv-matrix && "$python" -m venv "$venv"
    vpy="$ROOT/$venv/bin/python"
    pip_install() { "$vpy" -m pip install -q --disable-pip-version-check "$@" >>"$log" 2>&1; }
    : >"$log"

    start=$(date +%s)
    pip_install "torch==$TORCH" || { echo "test-matrix: torch==$TORCH did not install, see $log"; status=1; continue; }
    torch_s=$(( $(date +%s) - start ))
    torch_mb=$(du -sm "$venv" | cut -f1)
    torch_build=$("$vpy" -c "import torch; print(torch.__version__)" 2>>"$log")

    # The wheel with core dependencies only (numpy, ninja), then the smoke test from outside the source tree.
    wheels=$(mktemp -d)
    smoke="failed"
    if "$vpy" -m pip wheel -q --no-deps -w "$wheels" . >>"$log" 2>&1 && pip_install "$wheels"/srigl-*.whl \
        && smoke_out=$(cd "$wheels" && "$vpy" "$ROOT/tests/wheel_smoke.py" "$torch_build" 2>&1); then
        smoke=$(echo "$smoke_out" | grep "wheel smoke ok")
    else
        echo "${smoke_out:-}" >>"$log"; status=1
    fi
    rm -rf "$wheels"

    start=$(date +%s)
    pip_install -e '.[test]' "torch==$TORCH" || { echo "test-matrix: .[test] did not install, see $log"; status=1; }
    extras_s=$(( $(date +%s) - start ))
    venv_mb=$(du -sm "$venv" | cut -f1)
    versions=$("$vpy" -c "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in \
        ('torch', 'triton', 'numpy', 'transformers', 'lightning', 'onnxruntime')))" 2>>"$log")

    start=$(date +%s)
    SRIGL_DATA_DIR=$DATA "$vpy" -m pytest -n 2 -q -p no:cacheprovider \
        --deselect tests/test_wheel.py::test_wheel_installs_with_core_dependencies_and_trains_condenses_runs \
        $TESTS >"$ROOT/.venv-matrix/py$version.pytest.log" 2>&1
    pytest_rc=$?
    tests_s=$(( $(date +%s) - start ))
    [ $pytest_rc -eq 0 ] || status=1
    summary=$(tail -n 1 "$ROOT/.venv-matrix/py$version.pytest.log" | tr -d '=' | sed 's/^ *//; s/ *$//')
    failures=$(grep -E '^(FAILED|ERROR) ' "$ROOT/.venv-matrix/py$version.pytest.log" | cut -c1-200)
    echo "test-matrix: Python $version: wheel smoke: ${smoke}; pytest: $summary"

    {
        echo "## $($python --version) — $(date -u +%Y-%m-%d)"
        echo
        echo "| step | result |"
        echo "|---|---|"
        echo "| interpreter | \`$python\` |"
        echo "| \`pip install torch==$TORCH\` in a fresh venv | ${torch_s} s, ${torch_mb} MB (torch $torch_build with its nvidia-* and triton dependencies: PyPI's only build for this Python) |"
        echo "| wheel smoke (\`tests/wheel_smoke.py\`, wheel + core dependencies only) | ${smoke:-failed, see the log} |"
        echo "| \`pip install -e '.[test]'\` | ${extras_s} s, venv ${venv_mb} MB in all; $versions |"
        echo "| \`pytest -n 2\` on \`$TESTS\` (test_wheel.py deselected) | $summary — ${tests_s} s |"
        echo
        if [ -n "$failures" ]; then echo "Failures:"; echo; echo "$failures" | sed 's/^/    /'; echo; fi
    } >"$body"
    write_section "$version" "$body"
    [ "$KEEP" = 1 ] || rm -rf "$venv"
done
exit $status
