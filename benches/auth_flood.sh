#!/usr/bin/env bash
# The CPU a flood of distinct forged tokens costs the gateway, with and without the
# per-certificate limit on failed authentications (docs/benchmarks.md). Needs a release build.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
trap 'rm -f deploy/dev/flood.yaml' EXIT
B=target/release/xgate
$B demo --providers-only > /tmp/prov.log 2>&1 &
PROV=$!
sleep 1
for mode in limited unlimited limited unlimited; do
  rm -rf /tmp/flood-audit; mkdir -p /tmp/flood-audit
  sed -e "s|dir: ../../demo-audit|dir: /tmp/flood-audit|" -e "s|^admin_listen: .*|admin_listen: 127.0.0.1:9444|" deploy/dev/xgate.yaml > deploy/dev/flood.yaml
  if [ $mode = unlimited ]; then
    sed -i "s|^jwt:|jwt:\n  auth_failures_burst: 1000000000\n  auth_failures_per_second: 1000000000|" deploy/dev/flood.yaml
  fi
  sed -i "s|^  level: info|  level: warn|" deploy/dev/flood.yaml
  $B serve --config deploy/dev/flood.yaml > /tmp/gw.log 2>&1 &
  GW=$!
  sleep 1.5
  echo "== $mode"
  $B bench --as civil-affairs --forged-tokens 20000 --rate 2000 --duration 8 --warmup 0.5 --pid $GW | grep -E "calls/s|CPU|errors|UNAUTH|RESOURCE|cpu|per call" 
  kill $GW; wait $GW 2>/dev/null
done
kill $PROV; rm -f deploy/dev/flood.yaml
