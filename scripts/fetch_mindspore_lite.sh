#!/usr/bin/env bash
# Fetch the MindSpore Lite C++ API (headers + shared libraries) from PyPI and print the folder to use
# as MINDSPORE_PATH for ascend310_infer/build.sh:
#
#   MINDSPORE_PATH="$(bash scripts/fetch_mindspore_lite.sh)" bash ascend310_infer/build.sh
#
# The x86-64 Linux wheel of mindspore-lite (any Python tag: it is only unzipped, never installed) holds
# mindspore_lite/include/api/*.h and mindspore_lite/lib/libmindspore-extendrt_python.so with its
# dependencies. About 170 MB to download, 480 MB unpacked, cached in
#   ${ARCFACE_LITE_DIR:-${XDG_CACHE_HOME:-~/.cache}/arcface-ms/mindspore-lite-$VERSION}
# Environment: MSLITE_VERSION (default 2.0.0), MSLITE_PYTHON_VERSION (default 3.7), PYTHON (default python3).
# Exit status: 0 ok (path on stdout), 3 the download failed (e.g. no network), 1 anything else.
set -euo pipefail

VERSION="${MSLITE_VERSION:-2.0.0}"
PY_TAG="${MSLITE_PYTHON_VERSION:-3.7}"
PYTHON="${PYTHON:-python3}"
CACHE_ROOT="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}"
DEST="${ARCFACE_LITE_DIR:-$CACHE_ROOT/arcface-ms/mindspore-lite-$VERSION}"
PKG="$DEST/mindspore_lite"

if [ -f "$PKG/include/api/model.h" ] && [ -f "$PKG/lib/libmindspore-extendrt_python.so" ]; then
  echo "$PKG"
  exit 0
fi

mkdir -p "$DEST"
WORK="$(mktemp -d "$DEST/.fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "fetch_mindspore_lite.sh: downloading mindspore-lite==$VERSION (about 170 MB) into $DEST" >&2
if ! "$PYTHON" -m pip download "mindspore-lite==$VERSION" --no-deps --only-binary=:all: \
    --python-version "$PY_TAG" --disable-pip-version-check \
    -d "$WORK/download" >"$WORK/pip.log" 2>&1; then
  tail -n 5 "$WORK/pip.log" >&2
  echo "fetch_mindspore_lite.sh: error: pip download of mindspore-lite==$VERSION failed (no network or no such wheel)" >&2
  exit 3
fi
wheel="$(ls "$WORK"/download/mindspore_lite-*.whl 2>/dev/null | head -n 1)"
[ -n "$wheel" ] || { echo "fetch_mindspore_lite.sh: error: no wheel in $WORK/download" >&2; exit 1; }

# A wheel is a zip; Python's zipfile needs no unzip binary.
"$PYTHON" -m zipfile -e "$wheel" "$WORK/unpacked"
[ -f "$WORK/unpacked/mindspore_lite/include/api/model.h" ] ||
  { echo "fetch_mindspore_lite.sh: error: $wheel has no mindspore_lite/include/api/model.h" >&2; exit 1; }
rm -rf "$PKG"
mv "$WORK/unpacked/mindspore_lite" "$PKG"
echo "$PKG"
