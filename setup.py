# Two small compiled parts: the native core (_core) and the sandbox's Landlock/seccomp calls
# (_sandbox, only the launcher uses it); everything else is pure Python (see pyproject.toml).
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "capbus._core",
            sources=["src/capbus/_core.c"],
            depends=["src/capbus/_core_layout.h", "src/capbus/_core_ring.h",
                     "src/capbus/_core_limits.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "capbus._sandbox",
            sources=["src/capbus/_sandbox.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
