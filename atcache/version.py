"""The package version, written only here: pyproject.toml reads it, `atcache --version` prints it, every cache spec
and bench report records it."""

__version__ = "0.1.0"
