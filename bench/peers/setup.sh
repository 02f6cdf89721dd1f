#!/bin/sh
# Installs the bench-only peers of bench/peers.py. Never part of e2a's install or tests.
#
#   * Haraka (the Node.js MTA) with its SPF and DKIM plugins and the PostgreSQL client "pg",
#     from the npm registry, into bench/results/peers/haraka/ (gitignored);
#   * aiosmtpd and asyncpg for bench/peers/aiosmtpd_peer.py (and py-spy for --profile), with pip --target into
#     bench/results/peers/pylib/ (gitignored); bench/peers.py puts that folder on the peer's
#     PYTHONPATH, so the project's own environment (and setup.cfg) stays as it is. dkimpy,
#     pyspf and dnspython come from the project's environment (e2a uses them too).
#
# Usage, from the repository root:   sh bench/peers/setup.sh [PYTHON]
# PYTHON defaults to .venv/bin/python (the interpreter you run the bench with).
# Needs node >= 20 and npm for Haraka; without them only the Python peer is installed.
set -eu

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${1:-$REPO/.venv/bin/python}
OUT=$REPO/bench/results/peers
HARAKA_VERSION=3.3.4

mkdir -p "$OUT"

echo "== Python peer: aiosmtpd + asyncpg (+ py-spy for --profile) into $OUT/pylib"
"$PY" -m pip install --quiet --disable-pip-version-check --upgrade \
    --target "$OUT/pylib" "aiosmtpd>=1.4" "asyncpg>=0.29" "py-spy>=0.3"

if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
    echo "== Haraka $HARAKA_VERSION + haraka-plugin-spf + haraka-plugin-dkim + pg into $OUT/haraka"
    mkdir -p "$OUT/haraka"
    cd "$OUT/haraka"
    [ -f package.json ] || printf '{"name":"e2a-bench-haraka","private":true}\n' > package.json
    # --omit=optional: Haraka lists ~30 plugins as optional dependencies; only two are used.
    npm install --no-audit --no-fund --omit=optional \
        "Haraka@$HARAKA_VERSION" "haraka-plugin-spf@~1.3.0" "haraka-plugin-dkim@~1.3.1" "pg@^8.11"
    node -e 'console.log("haraka", require("Haraka/package.json").version)'
else
    echo "!! node/npm not found: Haraka skipped (bench/peers.py then runs without it)" >&2
fi
echo "== done"
