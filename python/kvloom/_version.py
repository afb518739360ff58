# The version lives in pyproject.toml; CMake compiles it into the C++ core.
from ._core import __version__  # noqa: F401
