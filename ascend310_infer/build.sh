#!/usr/bin/env bash
# Build ascend310_infer/out/main against a MindSpore or MindSpore Lite install holding the C++ API
# headers (include/api/model.h). The install is looked up, first found wins:
#   1. $MINDSPORE_PATH   (a Lite package, its runtime/ folder, or a full MindSpore install)
#   2. $LITE_HOME        (same layouts)
#   3. `pip show mindspore` / `pip show mindspore-lite`: <Location>/mindspore[_lite]/include/api/model.h,
#      with $PYTHON, the repository's .venv/bin/python, then python3 (skipped if ARCFACE_NO_PIP_SEARCH=1).
# Extra arguments go to cmake, e.g. `bash build.sh -DARCFACE_INFER_API=graph`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

die() {
  echo "build.sh: error: $*" >&2
  exit 1
}

has_api() {
  [ -f "$1/include/api/model.h" ] || [ -f "$1/runtime/include/api/model.h" ]
}

MS_DIR=""
FOUND_VIA=""
if [ -n "${MINDSPORE_PATH:-}" ]; then
  has_api "$MINDSPORE_PATH" ||
    die "MINDSPORE_PATH=$MINDSPORE_PATH has no include/api/model.h (nor runtime/include/api/model.h): point it at a MindSpore Lite package or a MindSpore install with the C++ API"
  MS_DIR="$MINDSPORE_PATH"
  FOUND_VIA="MINDSPORE_PATH"
elif [ -n "${LITE_HOME:-}" ]; then
  has_api "$LITE_HOME" ||
    die "LITE_HOME=$LITE_HOME has no include/api/model.h (nor runtime/include/api/model.h)"
  MS_DIR="$LITE_HOME"
  FOUND_VIA="LITE_HOME"
elif [ "${ARCFACE_NO_PIP_SEARCH:-0}" != "1" ]; then
  notes=""
  tried=""
  for py in "${PYTHON:-}" "$REPO/.venv/bin/python" python3; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    case " $tried " in *" $py "*) continue ;; esac
    tried="$tried $py"
    for pkg in mindspore mindspore-lite; do
      location="$("$py" -m pip show "$pkg" 2>/dev/null | sed -n 's/^Location: *//p' | head -n 1)" || true
      [ -n "$location" ] || continue
      candidate="$location/${pkg//-/_}"
      if has_api "$candidate"; then
        MS_DIR="$candidate"
        FOUND_VIA="pip show $pkg ($py)"
        break 2
      fi
      notes="$notes
  - $pkg installed at $candidate (for $py) has no include/api/model.h"
    done
  done
fi

if [ -z "$MS_DIR" ]; then
  if [ "${ARCFACE_NO_PIP_SEARCH:-0}" = "1" ]; then
    searched="pip search skipped (ARCFACE_NO_PIP_SEARCH=1)"
  else
    searched="no pip-installed mindspore or mindspore-lite ships include/api/model.h"
  fi
  die "no MindSpore C++ API found: MINDSPORE_PATH and LITE_HOME are unset and $searched.${notes:-}
The mindspore wheel ships no C++ API headers; use MindSpore Lite, for example:
  python3 -m pip download mindspore-lite==2.0.0 --no-deps --python-version 3.7 --only-binary=:all: -d /tmp/mslite
  unzip -q /tmp/mslite/mindspore_lite-2.0.0-*.whl -d /tmp/mslite/pkg
  MINDSPORE_PATH=/tmp/mslite/pkg/mindspore_lite bash $0
(or scripts/fetch_mindspore_lite.sh, or the extracted Lite tarball mindspore-lite-<version>-linux-x64)"
fi

command -v cmake >/dev/null 2>&1 || die "cmake not found (install cmake >= 3.14)"
MS_DIR="$(cd "$MS_DIR" && pwd)"
echo "build.sh: MindSpore C++ API from $MS_DIR (found via $FOUND_VIA)"

BUILD_DIR="$HERE/out/build"
mkdir -p "$BUILD_DIR"
cmake -S "$HERE" -B "$BUILD_DIR" -DMINDSPORE_PATH="$MS_DIR" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$BUILD_DIR" --parallel "$(nproc 2>/dev/null || echo 2)"
[ -x "$HERE/out/main" ] || die "the build finished but $HERE/out/main is missing"
echo "build.sh: built $HERE/out/main"
