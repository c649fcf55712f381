"""The package version (recorded in every cache spec and bench report)."""

__version__ = "0.1.0"
