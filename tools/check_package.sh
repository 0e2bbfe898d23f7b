#!/usr/bin/env bash
# The release artifacts as a user gets them: build the wheel and the sdist (python -m build), install
# the wheel into a clean virtual environment (torch pinned first, as `make` does), and run
# `odyssey --help` and `odyssey doctor` from there, outside the checkout.
# Usage: [BASE_PYTHON=python3] tools/check_package.sh PYTHON
#   PYTHON: the project's .venv python (it has `build`); BASE_PYTHON makes the clean venv.
set -euo pipefail
py=${1:-.venv/bin/python}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/odyssey-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
pipq=(-q --disable-pip-version-check)

"$py" -m build --outdir "$work/dist" "$root" > "$work/build.log" 2>&1 || { tail -n 30 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/odyssey-*.whl)
sdist=$(ls "$work"/dist/odyssey-*.tar.gz)
# the sdist carries the sources the wheel was built from
listing=$(tar -tzf "$sdist")
grep -q "odyssey/cli/__init__.py" <<< "$listing" || { echo "check_package: $sdist lacks odyssey/cli/__init__.py"; exit 1; }

"${BASE_PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/pip" install "${pipq[@]}" torch==2.13.0
"$work/venv/bin/pip" install "${pipq[@]}" "$wheel"
cd "$work"  # not the checkout: the installed package must stand on its own
"$work/venv/bin/odyssey" --help > /dev/null
# its compute probe caches under the work directory, not the user's ~/.cache/odyssey
ODYSSEY_CACHE_DIR="$work/cache" "$work/venv/bin/odyssey" doctor --read-test-mib 0 --models-dir "$work" > "$work/doctor.txt"
echo "package: $(basename "$wheel") and $(basename "$sdist") built; in a clean venv 'odyssey --help' and" \
     "'odyssey doctor' ran ($(grep -c . "$work/doctor.txt") lines)"
