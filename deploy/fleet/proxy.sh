#!/bin/sh
# docker-compose.yml, profile "fleet": one proxy of the fleet. On first start its home is a copy of
# the seed home (config.toml naming /secrets/pg.dsn, the master key, tls/); keys, key stores and
# credentials are in the shared database. Serves plain HTTP on 8080 behind HAProxy.
set -eu
HOME_DIR=/var/lib/xks-proxy
if [ ! -f "$HOME_DIR/config.toml" ]; then
  cp -R /seed/config.toml /seed/master.key /seed/tls "$HOME_DIR/"
fi
exec xks-proxy serve --home "$HOME_DIR" --http --host 0.0.0.0 --port 8080 --workers "${XKS_PROXY_WORKERS:-2}"
