# Sourced by the launchers: ROOT is the repository, PYTHON the interpreter that runs the project:
# $PYTHON when set, else the repository's .venv (made by `make install` / `make demo`), else `python`.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python; fi
fi
