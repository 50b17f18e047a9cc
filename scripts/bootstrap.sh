#!/usr/bin/env sh
# Creates .venv with a Python >= 3.12 and installs the project into it (once; re-run after pyproject changes).
# Looks for: $PYTHON, python3.13/3.12/python3/python on PATH, then interpreters managed by pyenv.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}

ok() {  # is "$@" a working Python >= 3.12?
  "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  if [ -n "${PYTHON:-}" ] && ok "$PYTHON"; then echo "$PYTHON"; return; fi
  for c in python3.13 python3.12 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && ok "$c"; then command -v "$c"; return; fi
  done
  if command -v pyenv >/dev/null 2>&1; then  # pyenv shims refuse versions that are not selected
    root=$(pyenv root)
    for v in $(pyenv versions --bare 2>/dev/null | sort -t. -k1,1n -k2,2n -k3,3n -r); do
      p="$root/versions/$v/bin/python3"
      if [ -x "$p" ] && ok "$p"; then echo "$p"; return; fi
    done
  fi
  return 1
}

stamp="$VENV/.installed-$EXTRAS"
if [ -x "$VENV/bin/python" ] && ok "$VENV/bin/python" && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
PY=$(find_python) || { echo "error: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
echo "bootstrap: using $PY ($("$PY" --version 2>&1))"
[ -x "$VENV/bin/python" ] && ok "$VENV/bin/python" || "$PY" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
touch "$stamp"
