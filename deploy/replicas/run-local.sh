#!/usr/bin/env bash
# Two gateway replicas sharing their limits through one Redis, on this machine:
#   redis-server on 127.0.0.1:6390, the sample providers on 8444/8445 (`xgate demo
#   --providers-only`), replica a on 8451 (admin 9451), replica b on 8452 (admin 9452).
# Ctrl-C stops everything. Needs redis-server (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --bin xgate
bin=target/release/xgate
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
redis-server --bind 127.0.0.1 --port 6390 --save "" --appendonly no >/dev/null &
pids+=($!)
"$bin" demo --providers-only &
pids+=($!)
for r in a:8451:9451 b:8452:9452; do
  IFS=: read -r name port admin <<<"$r"
  "$bin" serve --config deploy/replicas/xgate.yaml --listen "127.0.0.1:$port" \
    --admin-listen "127.0.0.1:$admin" --audit-dir "replicas-audit/$name" &
  pids+=($!)
done
cat <<MSG

Replicas: https://127.0.0.1:8451 and https://127.0.0.1:8452 (metrics: http://127.0.0.1:9451/metrics).
Try:  $bin call --gateway https://127.0.0.1:8452 --as civil-affairs query hukou.person_basic --purpose subsidy-eligibility --page-size 2
Ctrl-C stops everything.
MSG
wait
