#!/usr/bin/env bash
# The fleet of docker-compose.yml (profile "fleet"), on one machine without Docker, from Debian
# packages: PostgreSQL (apt-get install postgresql), N xks-proxy processes on their own ports,
# and HAProxy (apt-get install haproxy) terminating TLS in front of them with deploy/haproxy.cfg.
#
#   deploy/fleet/run-local.sh start DIR [N]    start N proxies (default 2) with everything under DIR
#   deploy/fleet/run-local.sh roll DIR [K...]  restart proxies K (default all) one at a time, as a
#                                              rolling upgrade does: drain, stop, (upgrade), start
#   deploy/fleet/run-local.sh restart DIR K... stop (if still running) and start proxies K at once,
#                                              without draining: what to do after a proxy crashed
#   deploy/fleet/run-local.sh stop DIR         stop all of it (the data stays in DIR)
#
# Environment (defaults): XKS_PROXY (the command to run: xks-proxy on PATH, else the repository's
# .venv/bin/xks-proxy beside this script, as `make install` makes it), XKS_HTTPS_ADDR (127.0.0.1:
# the address HAProxy's HTTPS endpoint binds; 0.0.0.0 for every interface), XKS_HTTPS_PORT (8443),
# XKS_BASE_PORT (9001: proxy k listens on BASE+k-1, plain HTTP on 127.0.0.1 only),
# XKS_PG_PORT (55432), XKS_WORKERS (1 per proxy), XKS_PREFIX (xks), XKS_REGION (us-east-1).
# Run as root, PostgreSQL runs as the `postgres` user, which must be able to reach DIR.
#
# What it makes in DIR: pg/ (the cluster, password authentication), pg.dsn (the connection
# string with its password, mode 600), home-1 .. home-N (proxy homes: home-1 made by
# `xks-proxy init` + `xks-proxy fleet init`, the others copies of it), haproxy.pem (home-1's
# development certificate for localhost, with its key), *.log and *.pid.
set -euo pipefail

usage() { sed -n '2,18p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
dir=$(realpath -m "$2")
shift 2
count=${1:-2}
here=$(cd "$(dirname "$0")" && pwd)
default_xks=xks-proxy
if ! command -v xks-proxy >/dev/null && [ -x "$here/../../.venv/bin/xks-proxy" ]; then
  default_xks=$(realpath "$here/../../.venv/bin/xks-proxy")
fi
read -ra xks <<< "${XKS_PROXY:-$default_xks}"
https_addr=${XKS_HTTPS_ADDR:-127.0.0.1}
https_port=${XKS_HTTPS_PORT:-8443}
base_port=${XKS_BASE_PORT:-9001}
pg_port=${XKS_PG_PORT:-55432}
workers=${XKS_WORKERS:-1}
prefix=${XKS_PREFIX:-xks}
region=${XKS_REGION:-us-east-1}

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi

wait_for() {  # wait_for WHAT COMMAND...: up to 30 s
  local what=$1; shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "run-local: $what did not come up (see $dir/*.log)" >&2
  return 1
}

need_xks() {
  command -v "${xks[0]}" >/dev/null || {
    echo "run-local: ${xks[0]} not found: run \`make install\` in the repository (this script then uses its .venv/bin/xks-proxy) or set XKS_PROXY" >&2
    exit 1; }
}

need_all() {  # everything `start` runs, checked before it starts anything
  need_xks
  [ -x "$pg_bin/initdb" ] && [ -x "$pg_bin/pg_ctl" ] && [ -x "$pg_bin/createdb" ] || {
    echo "run-local: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
  command -v haproxy >/dev/null || { echo "run-local: HAProxy is not installed (apt-get install haproxy)" >&2; exit 1; }
  command -v curl >/dev/null || { echo "run-local: curl is not installed (apt-get install curl)" >&2; exit 1; }
}

started=()   # what this `start` started: "pg" and pid files, stopped again if it fails half-way
undo_start() {
  local status=$?
  [ "$status" -ne 0 ] && [ ${#started[@]} -gt 0 ] || return 0
  echo "run-local: start failed; stopping what it started (logs: $dir/*.log)" >&2
  for what in "${started[@]}"; do
    if [ "$what" = pg ]; then "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    else stop_pidfile "$what"; fi
  done
}

pg_start() {
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w \
    -o "-h 127.0.0.1 -p $pg_port -k $dir/pg/sock" start >/dev/null
  started=(pg "${started[@]}")
}

start_postgres() {
  if [ ! -d "$dir/pg/data" ]; then
    mkdir -p "$dir/pg/sock"
    local password pwfile
    password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
    pwfile=$dir/pg/pwfile
    (umask 077; printf '%s\n' "$password" > "$pwfile")
    if [ ${#as_pg[@]} -gt 0 ]; then
      chmod o+x "$dir"; chown -R postgres "$dir/pg"
      "${as_pg[@]}" test -r "$pwfile" || {
        echo "run-local: the postgres user cannot reach $dir; make its parent directories traversable (chmod o+x)" >&2; exit 1; }
    fi
    "${as_pg[@]}" "$pg_bin/initdb" -D "$dir/pg/data" -U xks --pwfile="$pwfile" \
      --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 >"$dir/pg/initdb.log"
    rm -f "$pwfile"
    (umask 077; printf 'postgresql://xks:%s@127.0.0.1:%s/xks\n' "$password" "$pg_port" > "$dir/pg.dsn")
    pg_start
    PGPASSWORD=$password "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U xks xks
  else
    pg_start
  fi
}

make_homes() {
  if [ ! -f "$dir/home-1/config.toml" ]; then
    "${xks[@]}" init --home "$dir/home-1" --seal file --uri-prefix "$prefix" --region "$region" --port "$base_port" > "$dir/home-1.init.txt"
    "${xks[@]}" fleet init --home "$dir/home-1" --dsn-file "$dir/pg.dsn" > /dev/null
  fi
  for k in $(seq 2 "$count"); do
    if [ ! -d "$dir/home-$k" ]; then
      mkdir -m 700 "$dir/home-$k"
      cp -a "$dir/home-1/config.toml" "$dir/home-1/master.key" "$dir/home-1/tls" "$dir/home-$k/"
    fi
  done
  (umask 077; cat "$dir/home-1/tls/server.pem" "$dir/home-1/tls/server.key" > "$dir/haproxy.pem")
}

start_proxy() {  # start_proxy K
  setsid "${xks[@]}" serve --home "$dir/home-$1" --http --host 127.0.0.1 --port "$((base_port + $1 - 1))" \
    --workers "$workers" >>"$dir/proxy-$1.log" 2>&1 < /dev/null &
  echo $! > "$dir/proxy-$1.pid"
  started=("$dir/proxy-$1.pid" "${started[@]}")
}

start_proxies() {
  for k in $(seq 1 "$count"); do start_proxy "$k"; done
  for k in $(seq 1 "$count"); do
    wait_for "proxy $k" curl -sf "http://127.0.0.1:$((base_port + k - 1))/ping"
  done
}

roll_proxy() {  # roll_proxy K: the rolling-upgrade step for one proxy (docs/fleet.md)
  local k=$1 port=$((base_port + $1 - 1))
  "${xks[@]}" fleet drain --home "$dir/home-$k" >/dev/null      # its GET /ping answers 503 ...
  sleep 2                       # ... and HAProxy takes it out after two failed checks (within 0.75 s)
  stop_pidfile "$dir/proxy-$k.pid"                              # in-flight requests finish
  # (an upgrade happens here: a new package, image or virtualenv)
  "${xks[@]}" fleet resume --home "$dir/home-$k" >/dev/null
  start_proxy "$k"
  wait_for "proxy $k" curl -sf "http://127.0.0.1:$port/ping"
  sleep 2                       # HAProxy puts it back after two good checks (within 0.75 s)
  echo "rolled proxy $k"
}

start_haproxy() {
  cp "$here/../haproxy.cfg" "$dir/haproxy.cfg"
  local upstreams=()
  for k in $(seq 1 "$count"); do
    upstreams+=("XKS_UPSTREAM_$k=127.0.0.1:$((base_port + k - 1))")
    if [ "$k" -gt 2 ]; then echo "    server proxy$k \"\${XKS_UPSTREAM_$k}\"" >> "$dir/haproxy.cfg"; fi
  done
  env XKS_TLS_PEM="$dir/haproxy.pem" XKS_HTTPS_ADDR="$https_addr" XKS_HTTPS_PORT="$https_port" "${upstreams[@]}" \
    setsid haproxy -W -db -f "$dir/haproxy.cfg" >>"$dir/haproxy.log" 2>&1 < /dev/null &
  echo $! > "$dir/haproxy.pid"
  started=("$dir/haproxy.pid" "${started[@]}")
  local probe=$https_addr       # the development certificate names localhost: connect to the address
  case $probe in 0.0.0.0) probe=127.0.0.1 ;; ::) probe=::1 ;; esac
  wait_for "haproxy" curl -sf --cacert "$dir/home-1/tls/ca.pem" --resolve "localhost:$https_port:$probe" \
    "https://localhost:$https_port/ping"
}

stop_pidfile() {  # TERM the process group, wait up to 15 s
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$file"
}

case $action in
  start)
    [ "$count" -ge 2 ] || { echo "run-local: a fleet has at least 2 proxies" >&2; exit 2; }
    need_all
    mkdir -p -m 700 "$dir"
    trap undo_start EXIT
    start_postgres
    make_homes
    start_proxies
    start_haproxy
    started=()
    cat <<EOF
Fleet of $count proxies running under $dir
  endpoint:   https://localhost:$https_port/$prefix/kms/xks/v1   (CA: $dir/home-1/tls/ca.pem)
  listening:  HAProxy on $https_addr:$https_port
  proxies:    http://127.0.0.1:$base_port .. $((base_port + count - 1))  (logs: $dir/proxy-*.log)
  database:   postgresql://xks@127.0.0.1:$pg_port/xks  (connection string with password: $dir/pg.dsn)
  credential: ${xks[*]} stores export --home $dir/home-1
  a key:      ${xks[*]} keys create foo --home $dir/home-1
  stop:       $0 stop $dir
EOF
    ;;
  roll)
    need_xks
    proxies=("$@")
    if [ ${#proxies[@]} -eq 0 ]; then
      for home in "$dir"/home-*/; do home=${home%/}; proxies+=("${home##*-}"); done  # not home-1.init.txt
    fi
    for k in "${proxies[@]}"; do roll_proxy "$k"; done
    ;;
  restart)
    [ $# -ge 1 ] || usage
    need_xks
    for k in "$@"; do stop_pidfile "$dir/proxy-$k.pid"; start_proxy "$k"; done
    for k in "$@"; do wait_for "proxy $k" curl -sf "http://127.0.0.1:$((base_port + k - 1))/ping"; done
    ;;
  stop)
    stop_pidfile "$dir/haproxy.pid"
    for file in "$dir"/proxy-*.pid; do stop_pidfile "$file" & done   # all at once: each may take seconds
    wait
    if [ -d "$dir/pg/data" ]; then "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null || true; fi
    ;;
  *) usage ;;
esac
