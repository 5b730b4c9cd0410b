"""The package version, in a module of its own: records and cards name it without importing
the package's public API (and so without an import edge up to the package)."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version
