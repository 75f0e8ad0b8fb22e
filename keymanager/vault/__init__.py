"""The local key vault backend: AES keys sealed under the master key, in SQLite (one host) or
PostgreSQL (a fleet). Nothing outside this package imports its modules except the backend registry.
"""
