#!/usr/bin/env bash
# A smoke test of a running compose stack (docs/deploy.md): after `docker compose up -d --wait`, run
#   ./smoke.sh
# It waits for the gateway to be ready, sends one sampled request (a traceparent with the sampled flag, so the
# parent-based sampler records it whatever OTEL_TRACES_SAMPLER_ARG says), finds its trace in Jaeger by the
# x-trace-id answer header, prints the services the trace spans (the gateway's and a worker's at least), and
# checks through Prometheus' API that it scrapes every job (gateway, cachestate, controller, worker), the
# worker job with as many targets as prometheus/targets/*.json list (gen_workers.py writes them), and that
# every target is up. Exit 0 when all of that holds; 1, with one line saying what failed, otherwise; 2 when a
# tool it needs is missing.
#
# Needs bash, curl and python3 (for JSON) on the host. Each setting comes from the environment, else .env
# next to this script, else the default; the URLs, unless given, from the addresses and ports compose
# publishes on (an address of all interfaces, 0.0.0.0 or ::, is reached on 127.0.0.1):
#   SMOKE_GATEWAY_URL     http://${ONEPOOL_GATEWAY_BIND:-127.0.0.1}:${ONEPOOL_GATEWAY_PUBLISH_PORT:-8080}
#   SMOKE_JAEGER_URL      http://${ONEPOOL_UI_BIND:-127.0.0.1}:${ONEPOOL_JAEGER_UI_PORT:-16686}
#   SMOKE_PROMETHEUS_URL  http://${ONEPOOL_UI_BIND:-127.0.0.1}:${ONEPOOL_PROMETHEUS_PORT:-9090}
#   SMOKE_READY_TIMEOUT_S (300) for the gateway's /readyz; SMOKE_TRACE_TIMEOUT_S (60) for the trace to reach
#   Jaeger (spans are exported in batches every few seconds); SMOKE_TARGETS_TIMEOUT_S (60) for the targets;
#   SMOKE_POLL_S (2) between tries.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
  echo "smoke: FAIL: $*" >&2
  exit 1
}

for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "smoke: $tool is needed on this host" >&2; exit 2; }
done

# The value of a variable: the environment's, else .env's (a plain NAME=value line, the last one; quotes and
# a trailing ' # comment' dropped), else $2.
setting() {
  local name=$1 default=$2 line
  if [[ -n ${!name:-} ]]; then
    printf '%s' "${!name}"
    return
  fi
  if [[ -f $here/.env ]] && line=$(grep -E "^${name}=" "$here/.env" | tail -n 1); then
    line=${line#*=}
    line=${line%%[[:space:]]#*}
    line=${line%"${line##*[![:space:]]}"}
    line=${line%\"} line=${line#\"} line=${line%\'} line=${line#\'}
    if [[ -n $line ]]; then
      printf '%s' "$line"
      return
    fi
  fi
  printf '%s' "$default"
}

# The host of a URL to a port published on address $1: all interfaces are reached on 127.0.0.1; an IPv6
# address goes in brackets.
url_host() {
  case $1 in
    '' | 0.0.0.0 | :: | '[::]') printf '127.0.0.1' ;;
    \[*) printf '%s' "$1" ;;
    *:*) printf '[%s]' "$1" ;;
    *) printf '%s' "$1" ;;
  esac
}

gateway_host=$(url_host "$(setting ONEPOOL_GATEWAY_BIND 127.0.0.1)")
ui_host=$(url_host "$(setting ONEPOOL_UI_BIND 127.0.0.1)")
gateway=$(setting SMOKE_GATEWAY_URL "http://$gateway_host:$(setting ONEPOOL_GATEWAY_PUBLISH_PORT 8080)")
jaeger=$(setting SMOKE_JAEGER_URL "http://$ui_host:$(setting ONEPOOL_JAEGER_UI_PORT 16686)")
prometheus=$(setting SMOKE_PROMETHEUS_URL "http://$ui_host:$(setting ONEPOOL_PROMETHEUS_PORT 9090)")
ready_timeout=$(setting SMOKE_READY_TIMEOUT_S 300)
trace_timeout=$(setting SMOKE_TRACE_TIMEOUT_S 60)
targets_timeout=$(setting SMOKE_TARGETS_TIMEOUT_S 60)
poll=$(setting SMOKE_POLL_S 2)

# JSON is read by small Python programs: $1 the program, then its arguments (the file first); they print the
# answer or exit non-zero.
json() {
  python3 -c "$@"
}

# The worker targets Prometheus must have: those listed in the file-discovery files it reads.
count_targets='
import glob, json, os, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))
if not files:
    sys.exit("no *.json in " + sys.argv[1] + ": run gen_workers.py")
print(sum(len(group.get("targets", [])) for path in files for group in json.load(open(path))))
'
targets_dir=$here/prometheus/targets
workers_expected=$(json "$count_targets" "$targets_dir" 2>"$tmp/json.err") \
  || fail "the worker targets: $(cat "$tmp/json.err")"

# ---- 1. The gateway is ready (in sync with cachestate, a routable worker) ------------------------------------
deadline=$((SECONDS + ready_timeout))
until code=$(curl -sS -o "$tmp/readyz" -w '%{http_code}' --max-time 5 "$gateway/readyz" 2>"$tmp/curl.err") \
  && [[ $code == 200 ]]; do
  if ((SECONDS >= deadline)); then
    fail "the gateway at $gateway is not ready after ${ready_timeout}s: $(
      if [[ -s $tmp/readyz ]]; then cat "$tmp/readyz"; else cat "$tmp/curl.err"; fi
    )"
  fi
  sleep "$poll"
done
echo "smoke: gateway ready at $gateway"

# ---- 2. One sampled request -----------------------------------------------------------------------------------
trace_id=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
parent_id=$(python3 -c 'import secrets; print(secrets.token_hex(8))')
body='{"user_id": "onepool-smoke", "history": [1, 2, 3], "candidates": [4, 5, 6], "k": 2}'
code=$(curl -sS -o "$tmp/answer" -D "$tmp/headers" -w '%{http_code}' --max-time 10 \
  -H 'content-type: application/json' -H "traceparent: 00-$trace_id-$parent_id-01" \
  -d "$body" "$gateway/v1/recommend") || fail "POST $gateway/v1/recommend: no answer"
[[ $code == 200 ]] || fail "POST $gateway/v1/recommend answered $code: $(cat "$tmp/answer")"
answered=$(tr -d '\r' <"$tmp/headers" | awk 'tolower($1) == "x-trace-id:" { print $2 }' | tail -n 1)
[[ -n $answered ]] || fail "the gateway's answer has no x-trace-id header"
[[ $answered == "$trace_id" ]] || fail "x-trace-id $answered is not the trace id $trace_id sent in traceparent"
worker=$(json 'import json, sys; print(json.load(open(sys.argv[1]))["worker"])' "$tmp/answer") \
  || fail "the gateway's answer is not a ranking: $(cat "$tmp/answer")"
echo "smoke: ranked by $worker, trace $trace_id"

# ---- 3. Its trace in Jaeger, with the gateway's and a worker's spans --------------------------------------------
services_of='
import json, sys
data = json.load(open(sys.argv[1])).get("data") or []
services = set()
for trace in data:
    processes = trace.get("processes", {})
    for span in trace.get("spans", []):
        services.add(processes.get(span.get("processID"), {}).get("serviceName", "?"))
print(" ".join(sorted(services)))
'
deadline=$((SECONDS + trace_timeout))
services=""
while true; do
  code=$(curl -sS -o "$tmp/trace" -w '%{http_code}' --max-time 5 "$jaeger/api/traces/$trace_id" 2>"$tmp/curl.err") \
    || code="no answer ($(cat "$tmp/curl.err"))"
  if [[ $code == 200 ]]; then
    services=$(json "$services_of" "$tmp/trace") || fail "Jaeger's answer for trace $trace_id is not a trace"
    [[ " $services " == *" onepool-gateway "* && " $services " == *" onepool-worker "* ]] && break
  fi
  if ((SECONDS >= deadline)); then
    if [[ -n $services ]]; then
      fail "trace $trace_id in Jaeger spans only: $services (expected onepool-gateway and onepool-worker:" \
        "is OTEL_EXPORTER_OTLP_ENDPOINT reaching Jaeger from every service?)"
    fi
    fail "trace $trace_id not found in Jaeger at $jaeger after ${trace_timeout}s (last answer: $code)"
  fi
  sleep "$poll"
done
echo "smoke: trace $trace_id spans: $services"
echo "smoke: open $jaeger/trace/$trace_id"

# ---- 4. Prometheus scrapes every job, every worker, and every target is up ------------------------------------------
targets_of='
import json, sys
answer = json.load(open(sys.argv[1]))
workers_expected = int(sys.argv[2])
if answer.get("status") != "success":
    sys.exit("status " + str(answer.get("status")))
targets = answer["data"]["activeTargets"]
if not targets:
    sys.exit("no active targets")
jobs = {}
for t in targets:
    jobs.setdefault(t.get("labels", {}).get("job", "?"), []).append(t)
missing = [job for job in ("gateway", "cachestate", "controller", "worker") if job not in jobs]
if missing:
    sys.exit("no targets of job " + ", ".join(missing) + " (prometheus/prometheus.yml)")
workers = len(jobs["worker"])
if workers != workers_expected:
    sys.exit(f"{workers} worker targets, expected {workers_expected} (those of prometheus/targets/*.json)")
for t in targets:
    labels = t.get("labels", {})
    print(t.get("health"), labels.get("job", "?"), labels.get("instance", t.get("scrapeUrl", "?")), t.get("lastError", ""))
'
deadline=$((SECONDS + targets_timeout))
while true; do
  code=$(curl -sS -o "$tmp/targets" -w '%{http_code}' --max-time 5 "$prometheus/api/v1/targets?state=active" \
    2>"$tmp/curl.err") || code="no answer ($(cat "$tmp/curl.err"))"
  problem=""
  if [[ $code != 200 ]]; then
    problem="Prometheus at $prometheus answered $code"
  elif ! json "$targets_of" "$tmp/targets" "$workers_expected" >"$tmp/health" 2>"$tmp/json.err"; then
    problem="Prometheus' targets: $(cat "$tmp/json.err")"
  elif down=$(grep -v '^up ' "$tmp/health"); then
    problem="scrape targets not up: $(tr '\n' ';' <<<"$down")"
  else
    break
  fi
  ((SECONDS < deadline)) || fail "$problem"
  sleep "$poll"
done
while read -r health job instance _; do
  echo "smoke: target $job $instance $health"
done <"$tmp/health"
echo "smoke: OK"
