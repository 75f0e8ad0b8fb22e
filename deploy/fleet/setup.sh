#!/bin/sh
# docker-compose.yml, profile "fleet": one-shot, as root in the xks-proxy image, before PostgreSQL.
# Makes the fleet's secrets once, on the fleet-secrets volume, each readable only by its user:
#   pg_password   the database password (the postgres image's user, uid 999, reads it at first start)
#   pg.dsn        the connection string with that password (the proxies' user, xks: vault.dsn_file)
#   haproxy.pem   a development certificate for $XKS_PUBLIC_NAME and its key (HAProxy's user, uid 99);
#                 for production, mount your public-CA certificate chain + key at the same path.
#   tls/ca.pem    the development CA that signed it (give it to clients you test with)
set -eu
S=/secrets
umask 077
[ -s "$S/pg_password" ] || python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$S/pg_password"
printf 'postgresql://xks:%s@postgres:5432/xks\n' "$(cat "$S/pg_password")" > "$S/pg.dsn"
chown 999:999 "$S/pg_password"
chown xks:xks "$S/pg.dsn"
if [ ! -s "$S/haproxy.pem" ]; then
  python -c 'import sys; from pathlib import Path; from xks_proxy.devtls import make_dev_certs; make_dev_certs(Path(sys.argv[1]), tuple(sys.argv[2:]))' \
    "$S/tls" "${XKS_PUBLIC_NAME:-localhost}" localhost
  cat "$S/tls/server.pem" "$S/tls/server.key" > "$S/haproxy.pem"
fi
chown 99:99 "$S/haproxy.pem"
chmod 644 "$S/tls/ca.pem"
