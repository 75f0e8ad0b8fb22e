#!/usr/bin/env bash
# Make a development CA and a server certificate for the given names (default: localhost).
#   certs/make-dev-certs.sh OUTDIR [NAME ...]
# Writes OUTDIR/ca.pem, ca.key, server.pem (leaf + CA), server.key. For testing only.
set -euo pipefail
out=${1:?usage: make-dev-certs.sh OUTDIR [NAME ...]}; shift || true
names=("${@:-localhost}")
mkdir -p "$out"; umask 077
san="subjectAltName=IP:127.0.0.1"
for n in "${names[@]}"; do san+=",DNS:$n"; done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days 825 \
  -subj "/O=xks-proxy dev/CN=xks-proxy development CA" -keyout "$out/ca.key" -out "$out/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -subj "/O=xks-proxy dev/CN=${names[0]}" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial -days 824 \
  -extfile <(printf '%s\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n' "$san") \
  -out "$out/server.leaf.pem" 2>/dev/null
cat "$out/server.leaf.pem" "$out/ca.pem" > "$out/server.pem"
rm -f "$out/server.csr" "$out/server.leaf.pem" "$out/ca.srl"
echo "wrote $out/ca.pem and $out/server.pem for: ${names[*]}"
