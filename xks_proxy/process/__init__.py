"""The process model: how one `xks-proxy serve` runs as processes.

`runner` is the supervisor (it binds the port, forks the workers, restarts a dead one, and stops
them all on a signal) and each worker's start-up; `sidecar` is the supervisor's own small HTTP
listener (metrics across workers, certificate expiry); `reload` re-reads config.toml and the TLS
files on SIGHUP; `logsink` writes log and audit lines in batches without blocking a request.
Named for what it models (processes), not for one of them: the supervisor is only a part.
"""
