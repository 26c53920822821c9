/* crc32c over a buffer with AVX-512 carry-less multiplication (tandem.common.checksum).
 *
 * crc32c(data, value=0, /) -> int
 *
 * The same function as the `crc32c` package's `crc32c.crc32c` (Castagnoli polynomial, chained
 * through `value`: crc32c(b, crc32c(a)) == crc32c(a + b)), at about four times its speed on a
 * CPU with AVX-512 VPCLMULQDQ (Intel Ice Lake and newer, AMD Zen 4): the bulk of the buffer is
 * folded 256 bytes at a time with vector carry-less multiplies while five scalar crc32
 * streams run beside them. `supported()` says whether this CPU (and its OS) can run it;
 * checksum.py calls the package instead where it cannot, and never calls this module then.
 * `data` is anything with a C-contiguous buffer; the GIL is released for large buffers.
 *
 * The folding code is Peter Cawley's generated sample, unmodified (MIT, fast-crc32/, from
 * https://github.com/corsix/fast-crc32 at b44cb7f: `./generate -i avx512_vpclmulqdq -p crc32c
 * -a v4s5x3`). It is compiled here for those instructions only (a GCC target pragma around it),
 * so the rest of the module runs on any x86-64 CPU. Elsewhere (another compiler or CPU family)
 * the module builds without it and `supported()` is False.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#define RELEASE_GIL_BYTES (64 * 1024)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) /* GCC's target pragmas */
#define HAVE_VPCLMULQDQ 1
#pragma GCC push_options
#pragma GCC target("sse4.2,pclmul,avx512f,avx512vl,vpclmulqdq")
#define crc32_impl tandem_crc32c_vpclmulqdq
#include "fast-crc32/crc32c_avx512_vpclmulqdq_v4s5x3.c"
#undef crc32_impl
#pragma GCC pop_options
#endif

static int cpu_supported(void)
{
#ifdef HAVE_VPCLMULQDQ
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("vpclmulqdq");
#else
    return 0;
#endif
}

static int supported_here;

static PyObject *supported(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(supported_here);
}

static PyObject *crc32c(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "crc32c() takes 1 or 2 positional arguments (%zd given)", nargs);
        return NULL;
    }
    if (!supported_here) {
        PyErr_SetString(PyExc_RuntimeError, "crc32c: this CPU lacks AVX-512 VPCLMULQDQ (see supported())");
        return NULL;
    }
    uint32_t value = 0;
    if (nargs == 2) {
        unsigned long long v = PyLong_AsUnsignedLongLong(args[1]);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            return NULL;
        }
        if (v > 0xFFFFFFFFull) {
            PyErr_SetString(PyExc_OverflowError, "crc32c: value must be a 32-bit crc");
            return NULL;
        }
        value = (uint32_t)v;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
#ifdef HAVE_VPCLMULQDQ
    if (view.len >= RELEASE_GIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        value = tandem_crc32c_vpclmulqdq(value, (const char *)view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        value = tandem_crc32c_vpclmulqdq(value, (const char *)view.buf, (size_t)view.len);
    }
#endif
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(value);
}

static PyMethodDef methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))crc32c, METH_FASTCALL,
     "crc32c(data, value=0, /) -> int: crc32c of data, continuing from value."},
    {"supported", supported, METH_NOARGS, "Whether this CPU can run crc32c()."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "tandem.common._crc32c", "crc32c with AVX-512 VPCLMULQDQ.", -1, methods,
};

PyMODINIT_FUNC PyInit__crc32c(void)
{
    supported_here = cpu_supported();
    return PyModule_Create(&module_def);
}
