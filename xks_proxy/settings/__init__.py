"""The configuration's pieces: the typed model, and one small parser per section of config.toml.

`xks_proxy.config` is the entry callers use (`load`, `read_raw`, `from_raw`, and the names
re-exported from here). This package holds what that entry assembles, in layers that only look
down, so that nothing here imports the key backends' registry or the fleet:

- `fields`: `ConfigError` and the helpers reading one field of a TOML table (a leaf: the
  backends' own section parsers, `keymanager/<backend>/config.py`, use it too);
- `model`: the frozen dataclasses (`Config`, `ServerConfig`, `Store`, ...);
- `sections`: `[server]`, `[limits]`, `[tls]`, `[throttle]`, `[metrics]`, `[audit]`, `[fleet]`,
  `[master_key]`; `admin`: `[admin]`; `stores`: `[[stores]]` and what derives from them.

This `__init__` imports nothing, so importing `xks_proxy.settings.fields` costs nothing more.
"""
