/* The extension's module and which kernels this CPU runs; compiled for the baseline x86-64 target
   so that asking is safe on any CPU (`avx512.c` and `avx2.c` hold the kernels). */
#include <Python.h>

enum { HM_AVX512 = 0, HM_AVX2 = 1 };

/* 1 when this CPU runs `isa`'s kernels for the dtype (0 float32, 1 bfloat16). */
int hm_supports(int isa, int dtype) {
    __builtin_cpu_init();
    if (isa == HM_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    return dtype == 1 ? base && __builtin_cpu_supports("avx512bf16") : base;
}

/* A module so that setuptools builds and imports it as any extension; the kernels are called
   through ctypes (which releases the GIL for the call). */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "hybrimoe's native CPU kernels", -1, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
