#!/usr/bin/env sh
# Creates .venv with a Python >= 3.12 and installs the project into it (once; re-run after pyproject changes).
# Takes $PYTHON if set; otherwise the NEWEST Python >= 3.12 among python3.N / python3 / python on PATH and the
# interpreters managed by pyenv.  `scripts/bootstrap.sh --which-python` prints the choice and does nothing else.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}

version() {  # "major minor micro" of the Python "$1", or nothing if it is not a working Python
  "$1" -c 'import sys; print(*sys.version_info[:3])' 2>/dev/null || true
}

ok() {  # is "$1" a working Python >= 3.12?
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

candidates() {  # one path per line
  n=30
  while [ "$n" -ge 12 ]; do
    command -v "python3.$n" 2>/dev/null || true
    n=$((n - 1))
  done
  command -v python3 2>/dev/null || true
  command -v python 2>/dev/null || true
  if command -v pyenv >/dev/null 2>&1; then  # pyenv shims refuse versions that are not selected: use the binaries
    root=$(pyenv root)
    for v in $(pyenv versions --bare 2>/dev/null); do
      [ -x "$root/versions/$v/bin/python3" ] && echo "$root/versions/$v/bin/python3"
    done
  fi
}

find_python() {
  if [ -n "${PYTHON:-}" ] && ok "$PYTHON"; then echo "$PYTHON"; return; fi
  best=$(candidates | while read -r p; do
    v=$(version "$p")
    [ -n "$v" ] && ok "$p" && echo "$v $p"
  done | sort -k1,1nr -k2,2nr -k3,3nr | head -n 1)
  [ -n "$best" ] || return 1
  echo "${best#* * * }"
}

if [ "${1:-}" = "--which-python" ]; then
  find_python || { echo "error: no Python >= 3.12 found" >&2; exit 1; }
  exit 0
fi

stamp="$VENV/.installed-$EXTRAS"
if [ -x "$VENV/bin/python" ] && ok "$VENV/bin/python" && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
PY=$(find_python) || { echo "error: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
echo "bootstrap: using $PY ($("$PY" --version 2>&1))"
[ -x "$VENV/bin/python" ] && ok "$VENV/bin/python" || "$PY" -m venv --clear "$VENV"
# uv installs what pip would, from the same index, in about half the time here (34 s against 61 s on a fresh
# machine, most of it unpacking jax, jaxlib and libtpu). Bytecode is compiled at install, as pip does: where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines), every process would otherwise compile jax's
# sources again (5.7 s against 2.2 s per `import jax`). pip stays the fallback wherever uv cannot be installed.
if "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1; then
  "$VENV/bin/python" -m uv pip install -q --compile-bytecode --python "$VENV/bin/python" -e ".[$EXTRAS]"
else
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
fi
touch "$stamp"
