#!/bin/sh
# Container entry point: create the home on first start (printing the store's credentials once),
# then run the given xks-proxy command. Without Docker, the same two steps are
# `xks-proxy init --home DIR` and `xks-proxy serve --home DIR`.
set -eu
HOME_DIR="${XKS_PROXY_HOME:-/var/lib/xks-proxy}"
if [ ! -f "$HOME_DIR/config.toml" ]; then
  xks-proxy init --home "$HOME_DIR" \
    --uri-prefix "${XKS_PROXY_URI_PREFIX:-xks}" \
    --region "${XKS_PROXY_REGION:-us-east-1}" \
    --port "${XKS_PROXY_PORT:-8443}"
fi
exec xks-proxy "$@" --home "$HOME_DIR"
