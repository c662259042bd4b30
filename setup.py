"""Builds the compiled core (ext/dispatch/*.pyx -> dispatch._core); the rest is in pyproject.toml.

The core seals imported codes with OpenSSL's libcrypto (the one Python's ssl module
links), so building needs its headers: libssl-dev (Debian, Ubuntu) or openssl-devel.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("dispatch._core", ["ext/dispatch/_core.pyx"], extra_compile_args=["-O3"],
                   libraries=["crypto"])],
        include_path=["ext"],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
