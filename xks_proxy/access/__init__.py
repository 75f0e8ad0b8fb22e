"""Who may call, how often, and what is recorded: the access features around every request.

`mtls` (client certificates and TLS files; `tls_transport` starts TLS on each connection;
`tlshooks`, what `ssl` cannot set), `connections` (the connection cap and deadlines), `policy` (per-store allow rules), `throttle`
(per-store quotas), `audit` (the append-only audit log) and `metrics` (Prometheus). The server
applies them; none of them knows a key backend.
"""
