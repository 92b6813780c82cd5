"""The package version: one place, read by pyproject.toml, `eclip --version` and config.json."""

__version__ = "0.1.0"
