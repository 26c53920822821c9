/* The chain loop of `tandem.common.block_hash.hash_blocks`, compiled (DESIGN.md section 4).
 *
 * hash_chain(token_ids, block_size, extra, parent_hash, start_block) -> list[int]
 *
 * For each full block of `token_ids` from index `start_block` on, the hash is xxh3-64 (seed 0)
 * of the record `<Q parent | <I block_size | each token as <q | extra`, where parent is the
 * previous block's hash (`parent_hash` for the first one). This is `hash_block`'s definition,
 * byte for byte; block_hash.py keeps the pure-Python path and the tests compare the two.
 *
 * One record buffer is reused: its block_size and extra fields never change, so each block
 * writes its parent and its tokens and hashes the buffer. Token ids must be ints (or have
 * __index__) in the int64 range; anything else raises what struct.pack raises (struct.error,
 * same message), as the pure-Python path does. Only the tokens of the hashed blocks are read.
 *
 * XXH3 comes from the official single-header xxHash v0.8.2 (BSD-2-Clause, xxhash-0.8.2/).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash-0.8.2/xxhash.h"

#define HEADER_BYTES 12 /* <Q parent, <I block_size */
#define STACK_RECORD_BYTES 2048

static PyObject *pack_q; /* struct.Struct("<q").pack: the slow path and the errors of pack_token */

static void put_le64(unsigned char *out, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(v >> (8 * i));
    }
}

static void put_le32(unsigned char *out, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        out[i] = (unsigned char)(v >> (8 * i));
    }
}

/* Write one token id as <q at `slot`, or return -1 with an exception set. A plain int in
 * range is the fast path; anything else (out of range, an int subclass, an object with
 * __index__, not an integer at all) goes through struct.Struct("<q").pack itself, so the
 * value or the error (struct.error, with this Python's own message) is struct.pack's. */
static int pack_token(PyObject *item, unsigned char *slot)
{
    if (PyLong_CheckExact(item)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow == 0 && !(v == -1 && PyErr_Occurred())) {
            put_le64(slot, (uint64_t)v);
            return 0;
        }
        PyErr_Clear();
    }
    PyObject *packed = PyObject_CallOneArg(pack_q, item);
    if (packed == NULL) {
        return -1;
    }
    if (!PyBytes_Check(packed) || PyBytes_GET_SIZE(packed) != 8) {
        Py_DECREF(packed);
        PyErr_SetString(PyExc_SystemError, "struct.Struct('<q').pack did not return 8 bytes");
        return -1;
    }
    memcpy(slot, PyBytes_AS_STRING(packed), 8);
    Py_DECREF(packed);
    return 0;
}

/* Hash the blocks [start_block, num_full) of `seq` (a list or tuple from PySequence_Fast). */
static PyObject *chain(PyObject *seq, Py_ssize_t block_size, Py_ssize_t num_full, Py_ssize_t start_block,
                       const Py_buffer *extra, uint64_t parent, unsigned char *record, size_t record_bytes)
{
    PyObject *hashes = PyList_New(num_full - start_block);
    if (hashes == NULL) {
        return NULL;
    }
    put_le32(record + 8, (uint32_t)block_size);
    if (extra->len > 0) {
        memcpy(record + HEADER_BYTES + 8 * (size_t)block_size, extra->buf, (size_t)extra->len);
    }
    for (Py_ssize_t b = start_block; b < num_full; b++) {
        unsigned char *slot = record + HEADER_BYTES;
        for (Py_ssize_t i = b * block_size; i < (b + 1) * block_size; i++, slot += 8) {
            /* Re-read size and item each time: a token's __index__ may have changed a list. */
            if (i >= PySequence_Fast_GET_SIZE(seq)) {
                Py_DECREF(hashes);
                PyErr_SetString(PyExc_RuntimeError, "token_ids changed size during hashing");
                return NULL;
            }
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            Py_INCREF(item);
            int failed = pack_token(item, slot);
            Py_DECREF(item);
            if (failed) {
                Py_DECREF(hashes);
                return NULL;
            }
        }
        put_le64(record, parent);
        parent = XXH3_64bits(record, record_bytes);
        PyObject *h = PyLong_FromUnsignedLongLong(parent);
        if (h == NULL) {
            Py_DECREF(hashes);
            return NULL;
        }
        PyList_SET_ITEM(hashes, b - start_block, h);
    }
    return hashes;
}

static PyObject *hash_chain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError,
                     "hash_chain(token_ids, block_size, extra, parent_hash, start_block) takes 5 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    Py_ssize_t block_size = PyLong_AsSsize_t(args[1]);
    if (block_size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (block_size <= 0 || (unsigned long long)block_size > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "block_size must be in [1, 2**32), got %zd", block_size);
        return NULL;
    }
    Py_ssize_t start_block = PyLong_AsSsize_t(args[4]);
    if (start_block == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (start_block < 0) {
        PyErr_Format(PyExc_ValueError, "start_block must be >= 0, got %zd", start_block);
        return NULL;
    }
    uint64_t parent = PyLong_AsUnsignedLongLong(args[3]);
    if (parent == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "token_ids must be a sequence of ints");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t num_full = PySequence_Fast_GET_SIZE(seq) / block_size;
    if (num_full <= start_block) {
        Py_DECREF(seq);
        return PyList_New(0);
    }
    Py_buffer extra;
    if (PyObject_GetBuffer(args[2], &extra, PyBUF_SIMPLE) != 0) {
        Py_DECREF(seq);
        return NULL;
    }
    size_t token_bytes = 8 * (size_t)block_size;
    if ((size_t)extra.len > (size_t)PY_SSIZE_T_MAX - HEADER_BYTES - token_bytes) {
        PyBuffer_Release(&extra);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    size_t record_bytes = HEADER_BYTES + token_bytes + (size_t)extra.len;
    unsigned char stack_record[STACK_RECORD_BYTES];
    unsigned char *record = stack_record;
    if (record_bytes > sizeof stack_record) {
        record = PyMem_Malloc(record_bytes);
        if (record == NULL) {
            PyBuffer_Release(&extra);
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
    }
    PyObject *hashes = chain(seq, block_size, num_full, start_block, &extra, parent, record, record_bytes);
    if (record != stack_record) {
        PyMem_Free(record);
    }
    PyBuffer_Release(&extra);
    Py_DECREF(seq);
    return hashes;
}

static PyMethodDef methods[] = {
    {"hash_chain", (PyCFunction)(void (*)(void))hash_chain, METH_FASTCALL,
     "hash_chain(token_ids, block_size, extra, parent_hash, start_block) -> list[int]\n\n"
     "The chained xxh3-64 hashes of the full blocks of token_ids from start_block on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tandem.common._block_chain",
    .m_doc = "The compiled chain loop of tandem.common.block_hash.hash_blocks.",
    .m_size = -1,
    .m_methods = methods,
};

/* Single-phase init: `pack_q` is process-wide state, so the module does not claim support
 * for isolated subinterpreters. */
PyMODINIT_FUNC PyInit__block_chain(void)
{
    if (pack_q == NULL) {
        PyObject *struct_module = PyImport_ImportModule("struct");
        if (struct_module == NULL) {
            return NULL;
        }
        PyObject *packer = PyObject_CallMethod(struct_module, "Struct", "s", "<q");
        Py_DECREF(struct_module);
        if (packer == NULL) {
            return NULL;
        }
        pack_q = PyObject_GetAttrString(packer, "pack");
        Py_DECREF(packer);
        if (pack_q == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module_def);
}
