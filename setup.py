"""The project is declared in pyproject.toml; this file only adds the native CPU kernels.

The extension is optional: where it cannot be compiled (no C compiler, no OpenMP), the install
goes on and the runtime keeps torch's kernels (`hybrimoe/runtime/native/__init__.py`).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hybrimoe.runtime.native._kernels",
            sources=[f"hybrimoe/runtime/native/{name}.c" for name in ("module", "avx512", "avx2")],
            depends=["hybrimoe/runtime/native/common.h", "hybrimoe/runtime/native/kernels.h"],
            extra_compile_args=["-O3", "-fopenmp", "-std=c11"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
