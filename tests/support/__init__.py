"""Helpers the tests share (modules, not fixtures: the fixtures are in tests/conftest.py)."""

from pathlib import Path

#: The repository's root (the tests run the code and read docs/ and deploy/ from it).
ROOT = Path(__file__).resolve().parents[2]
