#!/usr/bin/env bash
# Create the secrets compose.yaml mounts (deploy/secrets/, never committed). Existing files
# are kept: delete one and rerun to rotate it (then restart the services that read it).
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir" "$dir/tls"
chmod 700 "$dir"
random() { python3 -c "import secrets; print(secrets.token_urlsafe($1))"; }
write() {  # name value; 0644 inside a 0700 folder: readable by the non-root container user only
    [[ -s "$dir/$1" ]] && return 0
    umask 022
    printf '%s\n' "$2" >"$dir/$1"
    echo "wrote $dir/$1"
}
write secret_key "$(random 50)"
write metrics_token "$(random 32)"
write postgres_password "$(random 24)"
write database_url "postgres://lowmag:$(cat "$dir/postgres_password")@postgres:5432/lowmag"
