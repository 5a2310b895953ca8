"""Build of aem's C core (``aem._core``): every ``.c`` file in src/aem/_core."""

from pathlib import Path

from setuptools import Extension, setup

core = Path("src/aem/_core")
sources = sorted(str(p) for p in core.glob("*.c"))
headers = sorted(str(p) for p in core.glob("*.h"))  # a changed header rebuilds the sources

setup(
    ext_modules=[
        Extension(
            "aem._core",
            sources=sources,
            depends=headers,
            include_dirs=[str(core)],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-fno-strict-aliasing"],
            libraries=["pthread"],
        )
    ],
)
