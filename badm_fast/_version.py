"""The version of badm_fast, in one place: read by ``pyproject.toml`` (setuptools' ``attr:``,
statically, without importing the package) and by ``badm_fast.__version__``."""

__version__ = "0.1.0"
