#!/bin/sh
# Container entry point: create the home on first start (printing the store's credentials once),
# then run the given xks-proxy command. Without Docker, the same two steps are
# `xks-proxy init --home DIR` and `xks-proxy serve --home DIR`.
# With $XKS_PROXY_PASSPHRASE set, the master key is sealed under it (Argon2id) and every start
# unseals with it (config.toml's [seal] passphrase_env); without it, the file seal (master key in
# clear in the volume: development only, `serve` warns).
set -eu
HOME_DIR="${XKS_PROXY_HOME:-/var/lib/xks-proxy}"
if [ -n "${XKS_PROXY_PASSPHRASE:-}" ]; then
  SEAL="--seal passphrase --passphrase-env XKS_PROXY_PASSPHRASE"
else
  SEAL="--seal file"
fi
if [ ! -f "$HOME_DIR/config.toml" ]; then
  # shellcheck disable=SC2086  # $SEAL is two or four words on purpose
  xks-proxy init --home "$HOME_DIR" $SEAL \
    --uri-prefix "${XKS_PROXY_URI_PREFIX:-xks}" \
    --region "${XKS_PROXY_REGION:-us-east-1}" \
    --port "${XKS_PROXY_PORT:-8443}"
fi
exec xks-proxy "$@" --home "$HOME_DIR"
