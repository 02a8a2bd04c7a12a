#!/usr/bin/env bash
# Make every replica behind a Service re-read the shared bundle store: POST /admin/reload on each ready
# endpoint of the Service. Use it after a hot deploy (PUT/POST/DELETE /admin/tasks/{task}) that reached
# one replica, or after writing a bundle into the store directly.
#
#   MHR_ADMIN_KEY=... deploy/reload-all.sh [-n NAMESPACE] [-s SERVICE] [--port-forward]
#
# Without --port-forward it calls the pod IPs directly, so it must run where they are reachable (a pod
# or Job in the cluster). With --port-forward it tunnels to each pod in turn through the API server
# (from a workstation). Exits non-zero if any replica failed to reload; that replica still serves the
# bundle it had, so rerun or restart it.
set -euo pipefail

kubectl=${KUBECTL:-kubectl}
namespace_args=()
service=mhr
port_forward=0
while [[ $# -gt 0 ]]; do
  case $1 in
    -n|--namespace) namespace_args=(--namespace "$2"); shift 2 ;;
    -s|--service) service=$2; shift 2 ;;
    --port-forward) port_forward=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [[ -z ${MHR_ADMIN_KEY:-} ]]; then
  echo "set MHR_ADMIN_KEY to the servers' admin key" >&2
  exit 2
fi

# EndpointSlices name the pods behind the Service; terminating or starting pods are not ready and are
# skipped (a starting pod reads the bundle store as it loads anyway).
slices=(get endpointslices "${namespace_args[@]}" -l "kubernetes.io/service-name=$service")
port=$("$kubectl" "${slices[@]}" -o jsonpath='{.items[0].ports[?(@.name=="http")].port}')
endpoints=$("$kubectl" "${slices[@]}" -o jsonpath='{range .items[*]}{range .endpoints[?(@.conditions.ready==true)]}{.targetRef.name}{" "}{.addresses[0]}{"\n"}{end}{end}')
if [[ -z $port || -z $endpoints ]]; then
  echo "no ready endpoints for service $service" >&2
  exit 1
fi

reload() {  # reload URL_BASE: POST /admin/reload, print the server's answer
  curl --silent --show-error --fail-with-body --max-time 300 -X POST \
    -H "Authorization: Bearer $MHR_ADMIN_KEY" "$1/admin/reload"
}

failed=0
local_port=18000
while read -r pod address; do
  [[ -z $pod ]] && continue
  if [[ $port_forward == 1 ]]; then
    local_port=$((local_port + 1))
    "$kubectl" port-forward "${namespace_args[@]}" "pod/$pod" "$local_port:$port" </dev/null >/dev/null &
    forward_pid=$!
    # Wait until the tunnel accepts connections (at most ~10 s).
    for _ in $(seq 50); do
      curl --silent --output /dev/null "http://127.0.0.1:$local_port/health" && break
      sleep 0.2
    done
    base="http://127.0.0.1:$local_port"
  else
    [[ $address == *:* ]] && address="[$address]"   # IPv6 literal in a URL
    base="http://$address:$port"
  fi
  if answer=$(reload "$base"); then
    echo "$pod: reloaded $answer"
  else
    echo "$pod: reload FAILED $answer" >&2
    failed=$((failed + 1))
  fi
  if [[ $port_forward == 1 ]]; then
    kill "$forward_pid" 2>/dev/null || true
    wait "$forward_pid" 2>/dev/null || true
  fi
done <<< "$endpoints"

if [[ $failed -gt 0 ]]; then
  echo "$failed replica(s) failed to reload" >&2
  exit 1
fi
