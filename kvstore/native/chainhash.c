/* The chained SHA-256 of docs/keys.md, one C loop over a prompt's chunks.
 *
 * chain(prefix, prev, tokens, chunk_bytes, count) -> list[bytes]
 *   k_i = SHA-256(prefix || k_{i-1} || tokens[i*chunk_bytes : (i+1)*chunk_bytes]),
 *   k_{-1} = prev, for i in [0, count).
 * `prefix` is the constant "kvstore-prefix-v1\0" || ns_id || u32le(C); the
 * hash state after it is computed once and copied for each chunk. Hashing
 * runs without the GIL. SHA-256 itself is OpenSSL's (libcrypto).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256_CTX: a plain struct, copied per chunk for free */
#include <openssl/sha.h>
#include <string.h>

#define KEY_BYTES 32

static void hash_chain(const unsigned char *prefix, size_t prefix_len, unsigned char *key,
                       const unsigned char *tokens, size_t chunk_bytes, Py_ssize_t count,
                       unsigned char *keys_out)
{
    SHA256_CTX base, ctx;
    SHA256_Init(&base);
    SHA256_Update(&base, prefix, prefix_len);
    for (Py_ssize_t i = 0; i < count; i++) {
        ctx = base;
        SHA256_Update(&ctx, key, KEY_BYTES);
        SHA256_Update(&ctx, tokens + (size_t)i * chunk_bytes, chunk_bytes);
        SHA256_Final(key, &ctx);
        memcpy(keys_out + (size_t)i * KEY_BYTES, key, KEY_BYTES);
    }
}

static PyObject *chain(PyObject *self, PyObject *args)
{
    Py_buffer prefix, prev, tokens;
    Py_ssize_t chunk_bytes, count;
    PyObject *result = NULL;
    unsigned char *keys = NULL;
    unsigned char key[KEY_BYTES];

    if (!PyArg_ParseTuple(args, "y*y*y*nn", &prefix, &prev, &tokens, &chunk_bytes, &count))
        return NULL;
    if (prev.len != KEY_BYTES) {
        PyErr_SetString(PyExc_ValueError, "prev must be 32 bytes");
        goto out;
    }
    if (chunk_bytes <= 0 || count < 0 || (count > 0 && chunk_bytes > tokens.len / count)) {
        PyErr_SetString(PyExc_ValueError, "count * chunk_bytes exceeds the token buffer");
        goto out;
    }
    keys = PyMem_Malloc(count > 0 ? (size_t)count * KEY_BYTES : 1);
    if (keys == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    memcpy(key, prev.buf, KEY_BYTES);
    Py_BEGIN_ALLOW_THREADS
    hash_chain(prefix.buf, (size_t)prefix.len, key, tokens.buf, (size_t)chunk_bytes, count, keys);
    Py_END_ALLOW_THREADS
    result = PyList_New(count);
    if (result == NULL)
        goto out;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *k = PyBytes_FromStringAndSize((const char *)keys + (size_t)i * KEY_BYTES, KEY_BYTES);
        if (k == NULL) {
            Py_CLEAR(result);
            goto out;
        }
        PyList_SET_ITEM(result, i, k);
    }
out:
    PyMem_Free(keys);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&prev);
    PyBuffer_Release(&tokens);
    return result;
}

static PyMethodDef methods[] = {
    {"chain", chain, METH_VARARGS, "chain(prefix, prev, tokens, chunk_bytes, count) -> list of 32-byte keys"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvstore._chainhash",
                                    "Chained SHA-256 prefix keys (docs/keys.md).", -1, methods};

PyMODINIT_FUNC PyInit__chainhash(void) { return PyModule_Create(&module); }
