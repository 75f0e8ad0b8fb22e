#!/bin/sh
# docker-compose.yml, profile "fleet": one-shot, as the xks user, once PostgreSQL is healthy.
# Makes the first proxy home on the fleet-seed volume and moves its vault and key store into the
# database (`xks-proxy init`, then `xks-proxy fleet init`), printing the store's credential once.
# Every proxy copies this home (config.toml, master.key, tls/) on its first start (proxy.sh).
# The demo fleet uses the file seal (master key in clear in the volume); for production, init with
# `--seal shamir` and unseal each proxy (docs/fleet.md, "Unsealing a fleet").
# Run again, it changes nothing.
set -eu
SEED=/var/lib/xks-proxy
if [ ! -f "$SEED/config.toml" ]; then
  xks-proxy init --home "$SEED" --seal file --uri-prefix "${XKS_PROXY_URI_PREFIX:-xks}" --region "${XKS_PROXY_REGION:-us-east-1}" --port 8080
fi
xks-proxy fleet init --home "$SEED" --dsn-file /secrets/pg.dsn
