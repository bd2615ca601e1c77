# The native core is the only compiled part; everything else is pure Python (see pyproject.toml).
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "capbus._core",
            sources=["src/capbus/_core.c"],
            depends=["src/capbus/_core_layout.h", "src/capbus/_core_ring.h",
                     "src/capbus/_core_limits.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
