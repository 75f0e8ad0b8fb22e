"""Several proxies sharing one vault in PostgreSQL: membership and health of each proxy
(`member`: heartbeat, drain, the fleet size in GetHealthStatus) and the key stores the fleet keeps
in its database instead of config.toml (`shared_settings`).
"""
