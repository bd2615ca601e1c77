# Three small compiled parts: the native core (_core), the part of it the trusted kernel uses
# (_layout: built from the same _native/ files, see layout_module.c) and the sandbox's
# Landlock/seccomp calls (_sandbox, only the launcher uses it); everything else is pure Python
# (see pyproject.toml).
from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "capbus._core",
            # One translation unit: module.c #includes every other file of _native/ (see there).
            sources=["src/capbus/_native/module.c"],
            depends=sorted(glob("src/capbus/_native/*")),
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "capbus._layout",
            # One translation unit: layout_module.c #includes these parts of _native/ (only these).
            sources=["src/capbus/_native/layout_module.c"],
            depends=[f"src/capbus/_native/{name}" for name in (
                "layout.h", "limits.h", "clock.h", "futex.h", "primitives.c", "helpers.c",
                "metrics.c", "dumpable.c")],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "capbus._sandbox",
            sources=["src/capbus/_sandbox.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
