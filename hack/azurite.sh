#!/usr/bin/env bash
# Azurite (Azure Blob Storage emulator) on loopback for tests and the embedded default.
#
#   hack/azurite.sh up       install if missing, start (idempotent: a running one is kept)
#   hack/azurite.sh down     stop it (idempotent; data in the state directory is kept)
#   hack/azurite.sh status   exit 0 when it answers
#   hack/azurite.sh env      print the export line for SR_AZURITE_ENDPOINT
#
# Installs npm `azurite@3.35.0` (runs on Node 20) into $SR_CACHE/azurite. State, log and
# pid live in $SR_AZURITE_DIR (default target/azurite-<port>). Port: SR_AZURITE_PORT.
# HTTPS: SR_AZURITE_CERT and SR_AZURITE_KEY (PEM files) serve https, and the readiness
# check trusts SR_AZURITE_CA only; SR_AZURITE_OAUTH=basic then accepts Entra bearer tokens
# (Azurite checks their claims, not their signature).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
SR_CACHE=${SR_CACHE:-$HOME/.cache/siterecovery}
# shellcheck source=versions.env
source "$here/versions.env"
PORT=${SR_AZURITE_PORT:-10000}
d=${SR_AZURITE_DIR:-$repo/target/azurite-$PORT}
prefix="$SR_CACHE/azurite"
bin="$prefix/node_modules/.bin/azurite-blob"
scheme=http
tls_args=()
if [ -n "${SR_AZURITE_CERT:-}" ]; then
  scheme=https
  tls_args=(--cert "$SR_AZURITE_CERT" --key "${SR_AZURITE_KEY:?SR_AZURITE_KEY must name the key of SR_AZURITE_CERT}")
  if [ -n "${SR_AZURITE_OAUTH:-}" ]; then tls_args+=(--oauth "$SR_AZURITE_OAUTH"); fi
fi
endpoint="$scheme://127.0.0.1:$PORT/devstoreaccount1"

log() { printf '[azurite] %s\n' "$*" >&2; }

pid_alive() { [ -f "$d/azurite.pid" ] && kill -0 "$(cat "$d/azurite.pid")" 2>/dev/null; }

# Any HTTP answer means it is serving; an anonymous request gets an error status back.
answers() {
  local ca=()
  if [ "$scheme" = https ]; then ca=(--cacert "${SR_AZURITE_CA:?SR_AZURITE_CA must name the CA of SR_AZURITE_CERT}"); fi
  curl -s -o /dev/null --max-time 2 "${ca[@]}" "$endpoint?comp=list"
}

install() {
  if [ -x "$bin" ] && [ "$(cat "$prefix/.version" 2>/dev/null)" = "$AZURITE_VERSION" ]; then
    return 0
  fi
  command -v npm >/dev/null || { log "npm (Node.js 20) is required to install Azurite"; exit 1; }
  log "installing azurite@$AZURITE_VERSION into $prefix"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >&2
  echo "$AZURITE_VERSION" >"$prefix/.version"
}

up() {
  if pid_alive && answers; then
    log "already running on 127.0.0.1:$PORT (pid $(cat "$d/azurite.pid"))"
    return 0
  fi
  pid_alive && down
  install
  mkdir -p "$d/data"
  # setsid: its own process group, so `down` stops node and nothing else.
  setsid "$bin" --blobHost 127.0.0.1 --blobPort "$PORT" --location "$d/data" \
    --disableTelemetry --skipApiVersionCheck --loose "${tls_args[@]}" >"$d/azurite.log" 2>&1 </dev/null &
  echo $! >"$d/azurite.pid"
  for _ in $(seq 1 100); do
    if answers; then
      log "ready on $endpoint"
      return 0
    fi
    if ! pid_alive; then break; fi
    sleep 0.2
  done
  log "azurite failed to start; last lines of $d/azurite.log:"
  tail -n 40 "$d/azurite.log" >&2 || true
  down
  exit 1
}

down() {
  if pid_alive; then
    local pid
    pid=$(cat "$d/azurite.pid")
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 -- "-$pid" 2>/dev/null || true
    log "stopped (pid $pid)"
  fi
  rm -f "$d/azurite.pid"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) pid_alive && answers ;;
  env) echo "export SR_AZURITE_ENDPOINT=$endpoint" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
