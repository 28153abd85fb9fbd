#!/usr/bin/env bash
# The production topology on one machine, without containers:
#   nginx (127.0.0.1:$NGINX_PORT) -> web: python -m portal.web (127.0.0.1:$WEB_PORT)
#   celery worker -Q gpu -c 1, celery worker -Q cpu -c 1
#   the local PostgreSQL (database $LOWMAG_LOCAL_DB, created if missing) and Redis.
#
# usage: deploy/run-local-prod.sh start|stop|status
#
# Every process runs in its own session; its PID is written to $LOWMAG_RUN_DIR/<name>.pid.
# `stop` signals each PID, waits for it, then kills whatever is left of its process group.
# Settings are the documented production ones (deploy/SETTINGS.md) except TLS: this stack
# speaks plain HTTP on loopback, so secure cookies, HSTS and the SSL redirect are off.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY="$REPO/deploy"
RUN_DIR="${LOWMAG_RUN_DIR:-$REPO/data/local-prod/run}"
DATA_DIR="${LOWMAG_LOCAL_DATA_DIR:-$REPO/data/local-prod/data}"
NGINX_PORT="${NGINX_PORT:-8080}"
WEB_PORT="${WEB_PORT:-${DAPHNE_PORT:-8001}}"   # DAPHNE_PORT: its earlier name
PG_HOST="${LOWMAG_PG_HOST:-127.0.0.1}"
PG_PORT="${LOWMAG_PG_PORT:-5432}"
PG_USER="${LOWMAG_PG_USER:-postgres}"
DB_NAME="${LOWMAG_LOCAL_DB:-lowmag_smoke}"
LOCAL_REDIS_URL="${LOWMAG_LOCAL_REDIS_URL:-redis://127.0.0.1:6379/5}"
PYTHON="${LOWMAG_PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
NGINX="${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
START_TIMEOUT="${LOWMAG_START_TIMEOUT:-120}"
STOP_TIMEOUT="${LOWMAG_STOP_TIMEOUT:-60}"
SERVICES=(web worker-gpu worker-cpu nginx)   # start order; stop goes in reverse

log() { printf '[run-local-prod] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

pid_of() { [[ -s "$RUN_DIR/$1.pid" ]] && cat "$RUN_DIR/$1.pid"; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
group_alive() { pgrep -g "$1" >/dev/null 2>&1; }

production_env() {
    # The production settings of deploy/production.env, adapted to HTTP on loopback.
    unset SECRET_KEY DATABASE_URL_FILE REDIS_URL_FILE METRICS_TOKEN
    export LOWMAG_PRODUCTION=true DEBUG=false
    export ALLOWED_HOSTS="127.0.0.1,localhost"
    export CSRF_TRUSTED_ORIGINS="http://127.0.0.1:$NGINX_PORT,http://localhost:$NGINX_PORT"
    export SESSION_COOKIE_SECURE=false CSRF_COOKIE_SECURE=false SECURE_SSL_REDIRECT=false
    export SECURE_HSTS_SECONDS=0
    export LOWMAG_DATA_DIR="$DATA_DIR"
    export DATABASE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB_NAME"
    export REDIS_URL="$LOCAL_REDIS_URL"
    export LOWMAG_TASK_MODE=celery
    export OMP_WAIT_POLICY=PASSIVE LOWMAG_TORCH_THREADS=1
    export LOG_FORMAT="${LOG_FORMAT:-json}" LOG_LEVEL="${LOG_LEVEL:-INFO}"
    export SECRET_KEY_FILE="$RUN_DIR/secret_key" METRICS_TOKEN_FILE="$RUN_DIR/metrics_token"
    export DJANGO_SETTINGS_MODULE=portal.settings PYTHONUNBUFFERED=1
}

make_secret() {  # file length: a random token, made once, readable by this user only
    [[ -s "$1" ]] && return 0
    (umask 077 && "$PYTHON" -c "import secrets; print(secrets.token_urlsafe($2))" >"$1")
}

ensure_nginx() {
    [[ -x "$NGINX" ]] && return 0
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        log "nginx is missing: installing Debian's nginx-light"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null; }
        NGINX="$(command -v nginx)"
        # The package may start a system nginx on port 80; this stack runs its own.
        if command -v service >/dev/null; then service nginx stop >/dev/null 2>&1 || true; fi
    fi
    [[ -x "$NGINX" ]] || die "nginx not found: apt-get install nginx-light (or set NGINX_BIN)"
}

check_services() {
    command -v psql >/dev/null || die "psql not found (PostgreSQL client)"
    pg_isready -h "$PG_HOST" -p "$PG_PORT" -q \
        || die "PostgreSQL is not answering on $PG_HOST:$PG_PORT"
    "$PYTHON" - "$REDIS_URL" <<'PY' || die "Redis is not answering at $REDIS_URL"
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=3).ping()
PY
}

ensure_database() {
    local psql=(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -qtA)
    if [[ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]]; then
        log "creating database $DB_NAME"
        "${psql[@]}" -c "CREATE DATABASE \"$DB_NAME\"" >/dev/null
    fi
}

render_nginx() {
    local dir="$RUN_DIR/nginx"
    mkdir -p "$dir/lowmag.d" "$dir/tmp"
    sed -e "s|\${NGINX_LISTEN}|127.0.0.1:$NGINX_PORT|g" \
        -e "s|\${LOWMAG_UPSTREAM}|127.0.0.1:$WEB_PORT|g" \
        -e "s|\${LOWMAG_STATIC_ROOT}|$DATA_DIR/static|g" \
        -e "s|\${NGINX_INCLUDE_DIR}|$dir/lowmag.d|g" \
        "$DEPLOY/nginx.conf" >"$dir/lowmag.conf"
    local user_line=""
    if [[ $EUID -eq 0 ]]; then  # workers run as the stack's user, who owns the static files
        user_line="user $(id -un) $(id -gn);"
    fi
    cat >"$dir/nginx.conf" <<EOF
$user_line
worker_processes 2;
pid $dir/nginx.pid;
error_log $RUN_DIR/nginx-error.log warn;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    access_log $RUN_DIR/nginx-access.log;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    include $dir/lowmag.conf;
}
EOF
    "$NGINX" -t -q -p "$dir" -e "$RUN_DIR/nginx-error.log" -c "$dir/nginx.conf" \
        || die "nginx rejected $dir/nginx.conf"
}

start_service() {  # name command...: its own session, PID file, log file (last one kept as .1)
    local name="$1"
    shift
    [[ -f "$RUN_DIR/$name.log" ]] && mv -f "$RUN_DIR/$name.log" "$RUN_DIR/$name.log.1"
    (cd "$REPO" && exec setsid "$@" >"$RUN_DIR/$name.log" 2>&1 </dev/null) &
    echo $! >"$RUN_DIR/$name.pid"
    log "started $name (pid $!)"
}

wait_until() {  # seconds description command...
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
        for name in "${SERVICES[@]}"; do
            local pid
            pid="$(pid_of "$name" || true)"
            if [[ -n "$pid" ]] && ! alive "$pid"; then
                log "$name exited early; last lines of $RUN_DIR/$name.log:"
                tail -n 20 "$RUN_DIR/$name.log" >&2 || true
                return 1
            fi
        done
        sleep 0.5
    done
}

healthz_ok() {
    "$PYTHON" - "http://127.0.0.1:$NGINX_PORT/healthz" <<'PY'
import json, sys, urllib.request
body = json.load(urllib.request.urlopen(sys.argv[1], timeout=5))
sys.exit(body.get("status") != "ok")
PY
}

cmd_start() {
    mkdir -p "$RUN_DIR" "$DATA_DIR"
    for name in "${SERVICES[@]}"; do
        alive "$(pid_of "$name" || true)" && die "$name is already running (run stop first)"
    done
    ensure_nginx
    production_env
    check_services
    make_secret "$RUN_DIR/secret_key" 50
    make_secret "$RUN_DIR/metrics_token" 32
    ensure_database
    log "migrate + collectstatic"
    (cd "$REPO" && "$PYTHON" manage.py migrate --noinput >"$RUN_DIR/migrate.log" 2>&1) \
        || { tail -n 30 "$RUN_DIR/migrate.log" >&2; die "migrate failed"; }
    (cd "$REPO" && "$PYTHON" manage.py collectstatic --noinput >"$RUN_DIR/collectstatic.log" 2>&1) \
        || { tail -n 30 "$RUN_DIR/collectstatic.log" >&2; die "collectstatic failed"; }
    render_nginx

    start_service web "$PYTHON" -m portal.web --host 127.0.0.1 --port "$WEB_PORT" --proxy-headers
    start_service worker-gpu "$BIN/celery" -A portal worker -Q gpu -c 1 -n "gpu@%h" \
        --without-mingle --without-gossip -l INFO
    start_service worker-cpu "$BIN/celery" -A portal worker -Q cpu -c 1 -n "cpu@%h" \
        --without-mingle --without-gossip -l INFO
    start_service nginx "$NGINX" -p "$RUN_DIR/nginx" -e "$RUN_DIR/nginx-error.log" \
        -c "$RUN_DIR/nginx/nginx.conf" -g "daemon off;"

    local ok=1
    wait_until "$START_TIMEOUT" "GET /healthz through nginx" healthz_ok || ok=0
    for queue in gpu cpu; do
        ((ok)) || break
        wait_until "$START_TIMEOUT" "the $queue worker" \
            grep -q " ready\." "$RUN_DIR/worker-$queue.log" || ok=0
    done
    if ((!ok)); then
        cmd_stop || true
        die "the stack did not come up; logs in $RUN_DIR"
    fi
    log "up: http://127.0.0.1:$NGINX_PORT/ (logs and PIDs in $RUN_DIR)"
}

signal_service() {  # name: ask it to stop (nginx: graceful QUIT; web, celery: warm TERM)
    local pid signal=TERM
    pid="$(pid_of "$1" || true)"
    [[ "$1" == nginx ]] && signal=QUIT
    if alive "$pid"; then kill "-$signal" "$pid" 2>/dev/null || true; fi
}

reap_service() {  # name: wait for it, then clear what is left of its process group
    local name="$1" pid deadline
    pid="$(pid_of "$name" || true)"
    [[ -n "$pid" ]] || return 0
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$pid"; then
        log "$name (pid $pid) did not stop in ${STOP_TIMEOUT}s: killing it"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # Children left in its process group (pool processes, nginx workers).
    deadline=$((SECONDS + 10))
    while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if group_alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    while alive "$pid"; do sleep 0.1; done
    rm -f "$RUN_DIR/$name.pid"
    log "stopped $name"
}

cmd_stop() {
    # nginx first (no new requests), then the rest together.
    signal_service nginx
    reap_service nginx
    local name
    for name in web worker-gpu worker-cpu; do signal_service "$name"; done
    for name in web worker-gpu worker-cpu; do reap_service "$name"; done
}

cmd_status() {
    local running=0 name pid
    for name in "${SERVICES[@]}"; do
        pid="$(pid_of "$name" || true)"
        if alive "$pid"; then
            echo "$name: running (pid $pid)"
            running=$((running + 1))
        else
            echo "$name: stopped"
        fi
    done
    ((running == ${#SERVICES[@]})) && return 0
    ((running == 0)) && return 3
    return 1
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
