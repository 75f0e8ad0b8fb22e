"""The process model: how one `xks-proxy serve` runs as processes.

`supervisor` is `serve` and the supervisor (it binds the port, forks the workers, restarts a
dead one, and passes stops and reloads on to them); `worker` is one worker's start-up and life
until a stop; `sidecar` is the supervisor's helper process (the one audit file, metrics across
workers, certificate expiry); `reload` re-reads config.toml and the TLS files on SIGHUP;
`logsink` writes log and audit lines in batches without blocking a request.
Named for what it models (processes), not for one of them: the supervisor is only a part.
"""
