/* The CacheGen coder of docs/codecs.md, cachegen: quantization, frequency tables and a byte-wise
 * 32-bit range coder (LZMA-style carry handling) over many independent streams.
 *
 * Python API (kvstore/_rangecoder.pyi); every buffer is little-endian, every heavy loop runs
 * without the GIL, every error is a ValueError (the codec turns it into CodecError):
 *
 *   token_codes(src, dtype, slabs, tokens, channels, exact, heads) -> bytes (int8 [slabs][tokens - exact])
 *   quant_params(src, dtype, slabs, tokens, channels, exact, targets, tscale) -> bytes
 *   quantize(src, dtype, slabs, tokens, channels, exact, qparams, rnd256, plo, pn, tscale)
 *       -> (symbols, lo, n, freq)
 *   histogram(symbols, slabs, tokens_q, channels) -> bytes (u32 counts [slabs*channels][255])
 *   encode_streams(symbols, slabs, tokens_q, channels, group, lo, n, freq, plo, pn, pfreq)
 *       -> (offsets, data)
 *   decode_symbols(data, offsets, slabs, tokens_q, channels, group, lo, n, freq, plo, pn, pfreq)
 *       -> bytes
 *   decode_chunk(data, offsets, slabs, tokens, channels, exact, group, lo, n, freq, plo, pn, pfreq,
 *                qparams, dtype, out, tscale) -> None
 *   rope(src, src_dtype, dst, dst_dtype, slabs, tokens, exact, heads, head_dim, kv_factor, table, rotate)
 *       -> None
 *   transform(src, dst, slabs, tokens, exact, heads, head_dim, matrices, live) -> None
 *
 * tscale: None, or the per-(slab, token) step codes of format 4 (int8 in [-8, 8], [slabs][tokens - exact]):
 * the step of (slab, token, channel) is then step[channel] * CG_TMULT[code], an exact float product.
 *
 * The same arithmetic lives in kvstore/codecs/kernels/cachegen.cu; both must stay bit-identical:
 * statistics are sequential double sums in token order, products that could be contracted into an
 * FMA are either exact or kept separate (fp-contract off below), conversions are bit operations.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define CG_M 65536u          /* total frequency of every table: 16-bit frequencies */
#define CG_NSYM 255          /* symbols 0..254 stand for q = symbol - 127 */
#define CG_QMAX 127
#define CG_TOP (1u << 24)    /* range is renormalized to stay >= 2^24 */
#define CG_FLT_MIN_BITS 0x00800000u
#define CG_LANES 2           /* streams the CPU decoder runs side by side */

enum { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2 };

/* ---------------------------------------------------------------- float bit operations */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline void st16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void st32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline uint32_t ld32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return u2f(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return u2f(sign);
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        return u2f(sign | (e << 23) | ((m & 0x3FF) << 13));
    }
    return u2f(sign | ((e + 112) << 23) | (m << 13));
}

static inline uint16_t f32_to_f16(float f) {  /* round to nearest, ties to even */
    uint32_t x = f2u(f), sign = (x >> 16) & 0x8000;
    x &= 0x7FFFFFFFu;
    if (x >= 0x7F800000u) return (uint16_t)(sign | (x > 0x7F800000u ? 0x7E00 : 0x7C00));
    if (x >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);
    if (x < 0x38800000u) {  /* below 2^-14: a float16 subnormal (units of 2^-24) or zero */
        uint32_t e = x >> 23, m = (x & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
        if (e < 102) return (uint16_t)sign;
        uint32_t res = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (res & 1))) res++;
        return (uint16_t)(sign | res);
    }
    x += 0xFFFu + ((x >> 13) & 1);
    return (uint16_t)(sign | ((x - 0x38000000u) >> 13));
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest, ties to even (inputs are finite) */
    uint32_t u = f2u(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

static inline uint16_t f32_to_bf16_up(float f) {  /* a positive float rounded up to bfloat16 */
    uint32_t u = f2u(f);
    if (u & 0xFFFFu) u += 0x10000u;
    return (uint16_t)(u >> 16);
}

static inline float load_value(const uint8_t *src, int dtype, size_t i) {
    if (dtype == DT_BF16) return u2f((uint32_t)ld16(src + 2 * i) << 16);
    if (dtype == DT_F16) return f16_to_f32(ld16(src + 2 * i));
    float f;
    memcpy(&f, src + 4 * i, 4);
    return f;
}

static inline void store_value(uint8_t *dst, int dtype, size_t i, float y) {
    if (dtype == DT_BF16) st16(dst + 2 * i, f32_to_bf16(y));
    else if (dtype == DT_F16) st16(dst + 2 * i, f32_to_f16(y));
    else memcpy(dst + 4 * i, &y, 4);
}

/* ---------------------------------------------------------------- argument helpers */

static int fail(const char *msg) { PyErr_SetString(PyExc_ValueError, msg); return -1; }

static int itemsize_of(int dtype) { return dtype == DT_F32 ? 4 : 2; }

typedef struct { Py_ssize_t slabs, tokens, channels, exact, group; } geom_t;

/* n = a * b with an overflow check against a generous bound (inputs are bounded by the container). */
static int mul(Py_ssize_t a, Py_ssize_t b, Py_ssize_t *n) {
    if (a < 0 || b < 0 || (a > 0 && b > ((Py_ssize_t)1 << 46) / a)) return fail("geometry out of range");
    *n = a * b;
    return 0;
}

static int check_geom(const geom_t *g) {
    if (g->slabs < 1 || g->channels < 1 || g->tokens < 0 || g->exact < 0 || g->exact > g->tokens)
        return fail("bad geometry: need slabs >= 1, channels >= 1, 0 <= exact <= tokens");
    if (g->group < 1 || g->group > 4096) return fail("group must be in [1, 4096]");
    return 0;
}

static int get_opt_buffer(PyObject *obj, Py_buffer *view, int writable) {
    view->obj = NULL;
    view->buf = NULL;
    view->len = 0;
    if (obj == Py_None) return 0;
    return PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS);
}

static void release(Py_buffer *view) { if (view->obj != NULL) PyBuffer_Release(view); }

/* ---------------------------------------------------------------- per-token step scales (format 4) */

#define CG_TCODE_MAX 8
#define CG_TSTEP_MAX_EXP 0x7E00  /* with token codes a step is below 2^126: 4 times it is finite */
/* bfloat16(2^(k/4)) for k = -8..8, as float bits: every product with a bfloat16 step is exact. */
static const uint32_t CG_TMULT_BITS[2 * CG_TCODE_MAX + 1] = {
    0x3e800000u, 0x3e980000u, 0x3eb50000u, 0x3ed70000u, 0x3f000000u, 0x3f180000u, 0x3f350000u, 0x3f570000u,
    0x3f800000u, 0x3f980000u, 0x3fb50000u, 0x3fd70000u, 0x40000000u, 0x40180000u, 0x40350000u, 0x40570000u,
    0x40800000u};
/* 2^((2i + 1) / 8), i = 0..3, as double bits: a mantissa in [1, 2) at or above threshold i rounds up. */
static const uint64_t CG_TTHRESH_BITS[4] = {0x3ff172b83c7d517bull, 0x3ff4bfdad5362a27ull, 0x3ff8ace5422aa0dbull,
                                            0x3ffd5818dcfba487ull};

static inline float tmult(int8_t k) { return u2f(CG_TMULT_BITS[k + CG_TCODE_MAX]); }

/* round(4 * log2 n) of a positive normal double, rounded in the log domain against fixed thresholds on
 * the mantissa (no log taken, so every platform gets the same integer). */
static inline int64_t quarter_octave(double n) {
    uint64_t b, mb;
    memcpy(&b, &n, 8);
    int64_t e = (int64_t)((b >> 52) & 0x7FF) - 1023;
    mb = (b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
    double m, th;
    memcpy(&m, &mb, 8);
    int j = 0;
    for (int i = 0; i < 4; i++) {
        memcpy(&th, &CG_TTHRESH_BITS[i], 8);
        j += m >= th;
    }
    return 4 * e + j;
}

/* floor(a / b) for b > 0 */
static inline int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* Step codes of one slab's quantized tokens: n_t = sum over heads of the head vector's L2 norm
 * (double, heads and dims in order), c_t = quarter_octave(n_t), centre = the rounded mean of c_t over
 * tokens with n_t > 0, code = clamp(c_t - centre, -8, 8) (0 where n_t = 0). -1 on a non-finite value.
 * codes[t] scratch: int64 per token. */
static int slab_token_codes(const uint8_t *src, int dtype, const geom_t *g, Py_ssize_t heads, Py_ssize_t s,
                            int64_t *c, int8_t *out) {
    Py_ssize_t C = g->channels, D = C / heads, tq = g->tokens - g->exact;
    int64_t sum = 0, cnt = 0;
    for (Py_ssize_t t = 0; t < tq; t++) {
        size_t row = ((size_t)s * (size_t)g->tokens + (size_t)(g->exact + t)) * (size_t)C;
        double n = 0.0;
        for (Py_ssize_t h = 0; h < heads; h++) {
            double q = 0.0;
            for (Py_ssize_t d = 0; d < D; d++) {
                float x = load_value(src, dtype, row + (size_t)(h * D + d));
                if (!isfinite(x)) return -1;
                double xd = (double)x;
                q += xd * xd;
            }
            n += sqrt(q);
        }
        if (!(n < INFINITY)) return -1;
        if (n > 0.0) { c[t] = quarter_octave(n); sum += c[t]; cnt++; }
        else c[t] = INT64_MIN;
    }
    int64_t centre = cnt ? floor_div(2 * sum + cnt, 2 * cnt) : 0;
    for (Py_ssize_t t = 0; t < tq; t++) {
        int64_t k = c[t] == INT64_MIN ? 0 : c[t] - centre;
        out[t] = (int8_t)(k < -CG_TCODE_MAX ? -CG_TCODE_MAX : (k > CG_TCODE_MAX ? CG_TCODE_MAX : k));
    }
    return 0;
}

static PyObject *py_token_codes(PyObject *self, PyObject *args) {
    Py_buffer src;
    int dtype;
    Py_ssize_t heads;
    geom_t g = {0, 0, 0, 0, 1};
    if (!PyArg_ParseTuple(args, "y*innnnn", &src, &dtype, &g.slabs, &g.tokens, &g.channels, &g.exact, &heads))
        return NULL;
    PyObject *result = NULL;
    int64_t *scratch = NULL;
    Py_ssize_t nch, numel, nq;
    int bad = 0;
    if (check_geom(&g) < 0 || mul(g.slabs, g.channels, &nch) < 0 || mul(nch, g.tokens, &numel) < 0 ||
        mul(g.slabs, g.tokens - g.exact, &nq) < 0)
        goto out;
    if (dtype < 0 || dtype > 2 || src.len != numel * itemsize_of(dtype) || heads < 1 || g.channels % heads) {
        fail("source buffer or heads do not match the geometry");
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, nq);
    scratch = PyMem_Malloc(sizeof(int64_t) * (size_t)(g.tokens - g.exact + 1));
    if (result == NULL || scratch == NULL) { PyErr_NoMemory(); Py_CLEAR(result); goto out; }
    int8_t *codes = (int8_t *)PyBytes_AS_STRING(result);
    Py_ssize_t tq = g.tokens - g.exact;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < g.slabs && !bad; s++)
        bad = slab_token_codes(src.buf, dtype, &g, heads, s, scratch, codes + (size_t)s * (size_t)tq) < 0;
    Py_END_ALLOW_THREADS
    if (bad) { fail("KV holds NaN or infinite values"); Py_CLEAR(result); }
out:
    PyMem_Free(scratch);
    PyBuffer_Release(&src);
    return result;
}

/* The optional tscale buffer: None, or nq int8 codes in [-8, 8]. 1 when present, 0 when None, -1 on error. */
static int get_tscale(PyObject *obj, Py_buffer *view, Py_ssize_t nq) {
    int have = get_opt_buffer(obj, view, 0);
    if (have < 0) return -1;
    if (view->obj == NULL) return 0;
    if (view->len != nq) return fail("token step codes have the wrong size for the geometry");
    const int8_t *k = view->buf;
    for (Py_ssize_t i = 0; i < nq; i++)
        if (k[i] < -CG_TCODE_MAX || k[i] > CG_TCODE_MAX) return fail("token step codes must be in [-8, 8]");
    return 1;
}

/* ---------------------------------------------------------------- quantization parameters */

typedef struct { double sum, sumsq; float mn, mx; } stat_t;

/* Per-channel statistics of one slab over its quantized tokens; -1 on a non-finite value. */
static int slab_stats(const uint8_t *src, int dtype, const geom_t *g, Py_ssize_t s, stat_t *st) {
    Py_ssize_t C = g->channels;
    for (Py_ssize_t c = 0; c < C; c++) {
        st[c].sum = 0.0; st[c].sumsq = 0.0; st[c].mn = INFINITY; st[c].mx = -INFINITY;
    }
    size_t base = (size_t)s * (size_t)g->tokens * (size_t)C;
    for (Py_ssize_t t = g->exact; t < g->tokens; t++) {
        size_t row = base + (size_t)t * (size_t)C;
        for (Py_ssize_t c = 0; c < C; c++) {
            float x = load_value(src, dtype, row + (size_t)c);
            if (!isfinite(x)) return -1;
            double xd = (double)x;
            st[c].sum += xd;
            st[c].sumsq += xd * xd;  /* exact: a float squared fits a double */
            if (x < st[c].mn) st[c].mn = x;
            if (x > st[c].mx) st[c].mx = x;
        }
    }
    return 0;
}

static inline float mean_bf16(const stat_t *st, Py_ssize_t n) {
    return u2f((uint32_t)f32_to_bf16((float)(st->sum / (double)n)) << 16);
}

/* With token step codes: each channel's largest |x - mu| / mult(code of x's token) (float, each
 * operation rounded on its own), the deviation its step must cover in 127 steps. */
static void slab_tdev(const uint8_t *src, int dtype, const geom_t *g, Py_ssize_t s, const stat_t *st,
                      const int8_t *codes, float *dev) {
    Py_ssize_t C = g->channels, n = g->tokens - g->exact;
    float *muf = dev + C;
    for (Py_ssize_t c = 0; c < C; c++) { dev[c] = 0.0f; muf[c] = n ? mean_bf16(&st[c], n) : 0.0f; }
    size_t base = (size_t)s * (size_t)g->tokens * (size_t)C;
    for (Py_ssize_t t = g->exact; t < g->tokens; t++) {
        size_t row = base + (size_t)t * (size_t)C;
        float m = tmult(codes[t - g->exact]);
        for (Py_ssize_t c = 0; c < C; c++) {
            float a = fabsf(load_value(src, dtype, row + (size_t)c) - muf[c]) / m;
            if (!(a <= dev[c])) dev[c] = a;  /* an infinite difference propagates */
        }
    }
}

/* (mu, step) bfloat16 pairs of one slab's channels; -1 when a step does not fit a float (with token
 * codes: when 4 times the step does not).
 * ab: the slab's per-channel step targets, a[c] then b[c] (doubles): target = sigma * a + b.
 * tdev: NULL, or the deviations of slab_tdev. */
static int slab_params(const stat_t *st, const geom_t *g, const double *a, const double *b, const float *tdev,
                       uint8_t *mu_out, uint8_t *step_out) {
    Py_ssize_t C = g->channels, n = g->tokens - g->exact;
    if (n == 0) {
        for (Py_ssize_t c = 0; c < C; c++) { st16(mu_out + 2 * c, 0); st16(step_out + 2 * c, 0x3F80); }
        return 0;
    }
    double varsum = 0.0;
    for (Py_ssize_t c = 0; c < C; c++) {
        double mean = st[c].sum / (double)n, msq = mean * mean;
        double var = st[c].sumsq / (double)n - msq;
        varsum += var > 0.0 ? var : 0.0;
    }
    double sigma = sqrt(varsum / (double)C);
    for (Py_ssize_t c = 0; c < C; c++) {
        uint16_t mu = f32_to_bf16((float)(st[c].sum / (double)n));
        float muf = u2f((uint32_t)mu << 16);
        float up = st[c].mx - muf, down = muf - st[c].mn;
        float dev = tdev ? tdev[c] : (up > down ? up : down);
        if (!isfinite(dev)) return -1;
        double step = (double)dev / 127.0, prod = sigma * a[c], target = prod + b[c];
        if (target > step) step = target;
        float stepf = (float)step;
        if (stepf < u2f(CG_FLT_MIN_BITS)) stepf = u2f(CG_FLT_MIN_BITS);
        uint16_t sb = f32_to_bf16_up(stepf);
        if ((sb & 0x7F80) == 0x7F80 || (tdev && (sb & 0x7F80) > CG_TSTEP_MAX_EXP)) return -1;
        st16(mu_out + 2 * c, mu);
        st16(step_out + 2 * c, sb);
    }
    return 0;
}

static PyObject *py_quant_params(PyObject *self, PyObject *args) {
    Py_buffer src, targets, ts = {0};
    PyObject *ts_o;
    int dtype;
    geom_t g = {0, 0, 0, 0, 1};
    if (!PyArg_ParseTuple(args, "y*innnny*O", &src, &dtype, &g.slabs, &g.tokens, &g.channels, &g.exact,
                          &targets, &ts_o))
        return NULL;
    PyObject *result = NULL;
    stat_t *st = NULL;
    double *ab = NULL;
    float *tdev = NULL;
    Py_ssize_t nch, numel, nq;
    int bad = 0, have_ts = 0;
    if (check_geom(&g) < 0 || mul(g.slabs, g.channels, &nch) < 0 || mul(nch, g.tokens, &numel) < 0 ||
        mul(g.slabs, g.tokens - g.exact, &nq) < 0 || (have_ts = get_tscale(ts_o, &ts, nq)) < 0)
        goto out;
    if (dtype < 0 || dtype > 2 || src.len != numel * itemsize_of(dtype) || targets.len != 16 * nch) {
        fail("source or step-target buffer has the wrong size for the geometry");
        goto out;
    }
    ab = PyMem_Malloc(16 * (size_t)nch);
    if (ab == NULL) { PyErr_NoMemory(); goto out; }
    memcpy(ab, targets.buf, 16 * (size_t)nch);
    for (Py_ssize_t i = 0; i < 2 * nch; i++)
        if (!(ab[i] >= 0.0 && ab[i] < 1e30)) { fail("step targets must be finite and in [0, 1e30)"); goto out; }
    result = PyBytes_FromStringAndSize(NULL, 4 * nch);
    st = PyMem_Malloc(sizeof(stat_t) * (size_t)g.channels);
    if (have_ts) tdev = PyMem_Malloc(2 * sizeof(float) * (size_t)g.channels);
    if (result == NULL || st == NULL || (have_ts && tdev == NULL)) { PyErr_NoMemory(); Py_CLEAR(result); goto out; }
    uint8_t *mu = (uint8_t *)PyBytes_AS_STRING(result), *step = mu + 2 * nch;
    const int8_t *codes = ts.buf;
    Py_ssize_t tq = g.tokens - g.exact;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < g.slabs && !bad; s++) {
        size_t c0 = (size_t)s * (size_t)g.channels;
        bad = slab_stats(src.buf, dtype, &g, s, st) < 0 ? 1 : 0;
        if (!bad && have_ts) slab_tdev(src.buf, dtype, &g, s, st, codes + (size_t)s * (size_t)tq, tdev);
        if (!bad && slab_params(st, &g, ab + c0, ab + nch + c0, tdev, mu + 2 * c0, step + 2 * c0) < 0) bad = 2;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        fail(bad == 1 ? "KV holds NaN or infinite values" : "KV values too large for cachegen steps");
        Py_CLEAR(result);
    }
out:
    PyMem_Free(st);
    PyMem_Free(ab);
    PyMem_Free(tdev);
    PyBuffer_Release(&src);
    PyBuffer_Release(&targets);
    release(&ts);
    return result;
}

/* ---------------------------------------------------------------- quantize + tables */

/* symbol = 127 + sign(u) * min(floor(|u| + rnd), 127), u = (x - mean) / step, rnd = rnd256 / 256:
 * 0.5 rounds to nearest (ties away from zero), a smaller rnd widens the zero bin (a deadzone). */
static inline uint8_t quantize_one(float x, float muf, float stepf, float rnd) {
    float u = (x - muf) / stepf;
    float m = floorf(fabsf(u) + rnd);
    if (m > (float)CG_QMAX) m = (float)CG_QMAX;
    int q = (int)m;
    return (uint8_t)(u < 0.0f ? CG_QMAX - q : CG_QMAX + q);
}

/* Frequencies (sum CG_M) of counts[0..n) (n >= 2, ends non-zero): floor(c*M/N), at least 1 where
 * c > 0, the remainder added to the first largest count. Written as u16le into out. */
static void normalize(const uint32_t *counts, int n, uint8_t *out) {
    uint64_t total = 0;
    int top = 0;
    for (int i = 0; i < n; i++) {
        total += counts[i];
        if (counts[i] > counts[top]) top = i;
    }
    uint32_t f[CG_NSYM];
    int64_t sum = 0;
    for (int i = 0; i < n; i++) {
        uint32_t v = (uint32_t)(((uint64_t)counts[i] * CG_M) / total);
        f[i] = counts[i] == 0 ? 0 : (v == 0 ? 1 : v);
        sum += f[i];
    }
    f[top] = (uint32_t)((int64_t)f[top] + (int64_t)CG_M - sum);
    for (int i = 0; i < n; i++) st16(out + 2 * i, (uint16_t)f[i]);
}

/* Table of one channel from its counts: (lo, n) and n>=2 frequencies appended at *fpos. */
static void channel_table(const uint32_t *counts, int plo, int pn, uint8_t *lo, uint8_t *n, uint8_t *freq,
                          size_t *fpos) {
    int first = -1, last = -1;
    for (int i = 0; i < CG_NSYM; i++)
        if (counts[i]) { if (first < 0) first = i; last = i; }
    if (first < 0) { *lo = CG_QMAX; *n = 1; return; }
    if (pn > 0 && first >= plo && last < plo + pn) { *lo = 0; *n = 0; return; }
    *lo = (uint8_t)first;
    *n = (uint8_t)(last - first + 1);
    if (*n >= 2) {
        normalize(counts + first, *n, freq + *fpos);
        *fpos += 2 * (size_t)*n;
    }
}

typedef struct {
    const uint8_t *src, *mu, *step, *plo, *pn;
    const int8_t *tcodes;  /* NULL, or [slabs][tokens - exact] step codes */
    int dtype;
    float rnd;
    uint8_t *sym, *lo, *n, *freq;
    size_t flen;
    uint32_t *counts;
} quant_job_t;

static void quantize_slab(quant_job_t *j, const geom_t *g, Py_ssize_t s) {
    Py_ssize_t C = g->channels, tq = g->tokens - g->exact;
    size_t ch0 = (size_t)s * (size_t)C;
    memset(j->counts, 0, sizeof(uint32_t) * CG_NSYM * (size_t)C);
    float *muf = (float *)(j->counts + CG_NSYM * (size_t)C), *stf = muf + C;
    for (Py_ssize_t c = 0; c < C; c++) {
        muf[c] = u2f((uint32_t)ld16(j->mu + 2 * (ch0 + c)) << 16);
        stf[c] = u2f((uint32_t)ld16(j->step + 2 * (ch0 + c)) << 16);
    }
    const size_t in0 = (size_t)s * (size_t)g->tokens * (size_t)C + (size_t)g->exact * (size_t)C;
    uint8_t *out = j->sym + (size_t)s * (size_t)tq * (size_t)C;
    for (Py_ssize_t t = 0; t < tq; t++) {
        float m = j->tcodes ? tmult(j->tcodes[(size_t)s * (size_t)tq + (size_t)t]) : 1.0f;
        for (Py_ssize_t c = 0; c < C; c++) {
            float x = load_value(j->src, j->dtype, in0 + (size_t)t * C + c);
            uint8_t q = quantize_one(x, muf[c], j->tcodes ? stf[c] * m : stf[c], j->rnd);
            out[(size_t)t * C + c] = q;
            j->counts[(size_t)c * CG_NSYM + q]++;
        }
    }
    for (Py_ssize_t c = 0; c < C; c++) {
        int plo = j->pn ? j->plo[ch0 + c] : 0, pn = j->pn ? j->pn[ch0 + c] : 0;
        channel_table(j->counts + (size_t)c * CG_NSYM, plo, pn, j->lo + ch0 + c, j->n + ch0 + c, j->freq,
                      &j->flen);
    }
}

/* Checks (mu, step) pairs: finite mu, finite positive step (below 2^126 with token codes). */
static int check_qparams(const uint8_t *qp, Py_ssize_t nch, int tscaled) {
    for (Py_ssize_t c = 0; c < nch; c++) {
        uint16_t mu = ld16(qp + 2 * c), step = ld16(qp + 2 * (nch + c));
        if ((mu & 0x7F80) == 0x7F80 || (step & 0x7F80) == 0x7F80 || (step & 0x8000) || (step & 0x7F80) == 0)
            return fail("qparams hold a non-finite mean or a step that is not a positive normal number");
        if (tscaled && (step & 0x7F80) > CG_TSTEP_MAX_EXP)
            return fail("qparams hold a step too large for token step codes");
    }
    return 0;
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    Py_buffer src, qp, plo, pn, ts = {0};
    PyObject *plo_o, *pn_o, *ts_o;
    int dtype;
    int rnd256;
    geom_t g = {0, 0, 0, 0, 1};
    if (!PyArg_ParseTuple(args, "y*innnny*iOOO", &src, &dtype, &g.slabs, &g.tokens, &g.channels, &g.exact, &qp,
                          &rnd256, &plo_o, &pn_o, &ts_o))
        return NULL;
    PyObject *result = NULL, *sym = NULL, *lo = NULL, *n = NULL;
    uint8_t *freq = NULL;
    quant_job_t j;
    memset(&j, 0, sizeof j);
    Py_ssize_t nch, numel, nq;
    int have_plo = get_opt_buffer(plo_o, &plo, 0), have_pn = get_opt_buffer(pn_o, &pn, 0);
    if (have_plo < 0 || have_pn < 0) goto out;
    Py_ssize_t nts;
    int have_ts = 0;
    if (check_geom(&g) < 0 || mul(g.slabs, g.channels, &nch) < 0 || mul(nch, g.tokens, &numel) < 0 ||
        mul(nch, g.tokens - g.exact, &nq) < 0 || mul(g.slabs, g.tokens - g.exact, &nts) < 0 ||
        (have_ts = get_tscale(ts_o, &ts, nts)) < 0)
        goto out;
    if (dtype < 0 || dtype > 2 || src.len != numel * itemsize_of(dtype) || qp.len != 4 * nch ||
        (plo.obj == NULL) != (pn.obj == NULL) || (plo.obj && (plo.len != nch || pn.len != nch))) {
        fail("buffer sizes do not match the geometry");
        goto out;
    }
    if (check_qparams(qp.buf, nch, have_ts) < 0) goto out;
    if (rnd256 < 0 || rnd256 > 128) { fail("rounding offset must be in [0, 128] / 256"); goto out; }
    sym = PyBytes_FromStringAndSize(NULL, nq);
    lo = PyBytes_FromStringAndSize(NULL, nch);
    n = PyBytes_FromStringAndSize(NULL, nch);
    freq = PyMem_Malloc(2 * (size_t)nch * CG_NSYM + 1);
    j.counts = PyMem_Malloc((sizeof(uint32_t) * CG_NSYM + 2 * sizeof(float)) * (size_t)g.channels);
    if (!sym || !lo || !n || !freq || !j.counts) { PyErr_NoMemory(); goto out; }
    j.src = src.buf; j.dtype = dtype; j.rnd = (float)rnd256 / 256.0f; j.mu = qp.buf; j.step = (const uint8_t *)qp.buf + 2 * nch;
    j.plo = plo.buf; j.pn = pn.buf; j.tcodes = have_ts ? ts.buf : NULL;
    j.sym = (uint8_t *)PyBytes_AS_STRING(sym); j.lo = (uint8_t *)PyBytes_AS_STRING(lo);
    j.n = (uint8_t *)PyBytes_AS_STRING(n); j.freq = freq;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < g.slabs; s++) quantize_slab(&j, &g, s);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("OOOy#", sym, lo, n, (const char *)freq, (Py_ssize_t)j.flen);
out:
    Py_XDECREF(sym); Py_XDECREF(lo); Py_XDECREF(n);
    PyMem_Free(freq); PyMem_Free(j.counts);
    PyBuffer_Release(&src); PyBuffer_Release(&qp); release(&plo); release(&pn); release(&ts);
    return result;
}

static PyObject *py_histogram(PyObject *self, PyObject *args) {
    Py_buffer sym;
    Py_ssize_t slabs, tq, C, nch, nq;
    if (!PyArg_ParseTuple(args, "y*nnn", &sym, &slabs, &tq, &C)) return NULL;
    PyObject *result = NULL;
    if (slabs < 1 || C < 1 || mul(slabs, C, &nch) < 0 || mul(nch, tq, &nq) < 0) goto out;
    if (sym.len != nq) { fail("symbols buffer has the wrong size"); goto out; }
    result = PyBytes_FromStringAndSize(NULL, 4 * nch * CG_NSYM);
    if (result == NULL) goto out;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(result);
    const uint8_t *p = sym.buf;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    uint32_t *cnt = calloc((size_t)nch * CG_NSYM, sizeof(uint32_t));
    if (cnt == NULL) bad = 1;
    for (Py_ssize_t s = 0; s < slabs && !bad; s++)
        for (Py_ssize_t i = 0; i < tq * C; i++) {
            uint8_t q = p[(size_t)s * tq * C + i];
            if (q >= CG_NSYM) { bad = 2; break; }
            cnt[((size_t)s * C + (size_t)(i % C)) * CG_NSYM + q]++;
        }
    if (!bad) for (size_t i = 0; i < (size_t)nch * CG_NSYM; i++) st32(o + 4 * i, cnt[i]);
    free(cnt);
    Py_END_ALLOW_THREADS
    if (bad) { Py_CLEAR(result); bad == 1 ? (void)PyErr_NoMemory() : (void)fail("symbol 255 is not valid"); }
out:
    PyBuffer_Release(&sym);
    return result;
}

/* ---------------------------------------------------------------- tables for coding */

typedef struct {
    uint32_t cum[CG_NSYM + 1];
    uint8_t bucket[256];
    uint8_t lo, n;
} ctab_t;

typedef struct {
    const uint8_t *lo, *n, *freq, *plo, *pn, *pfreq;
    size_t *off, *poff;
} tables_t;

/* Offsets of each channel's frequencies; -1 when sizes, ranges or sums are inconsistent. */
static int table_offsets(const uint8_t *lo, const uint8_t *n, const uint8_t *freq, Py_ssize_t flen,
                         Py_ssize_t nch, int allow_profile, size_t *off) {
    size_t pos = 0;
    for (Py_ssize_t c = 0; c < nch; c++) {
        off[c] = pos;
        if (n[c] == 0) {
            if (!allow_profile) return fail("a table refers to a cachegen profile that is not given");
            continue;
        }
        if ((int)lo[c] + (int)n[c] > CG_NSYM) return fail("a table's symbol range is past 255");
        if (n[c] == 1) continue;
        if (pos + 2 * (size_t)n[c] > (size_t)flen) return fail("frequency tables are truncated");
        uint32_t sum = 0;
        for (int i = 0; i < n[c]; i++) sum += ld16(freq + pos + 2 * i);
        if (sum != CG_M) return fail("a frequency table does not sum to 65536");
        pos += 2 * (size_t)n[c];
    }
    if (pos != (size_t)flen) return fail("frequency tables have trailing bytes");
    return 0;
}

static int tables_init(tables_t *tb, Py_buffer *lo, Py_buffer *n, Py_buffer *freq, Py_buffer *plo,
                       Py_buffer *pn, Py_buffer *pfreq, Py_ssize_t nch) {
    memset(tb, 0, sizeof *tb);
    if (lo->len != nch || n->len != nch) return fail("table lo/n sizes do not match the channels");
    int prof = plo->obj != NULL;
    if (prof != (pn->obj != NULL) || prof != (pfreq->obj != NULL) || (prof && (plo->len != nch || pn->len != nch)))
        return fail("profile tables are incomplete or do not match the channels");
    tb->off = PyMem_Malloc(sizeof(size_t) * (size_t)nch * 2 + 1);
    if (tb->off == NULL) { PyErr_NoMemory(); return -1; }
    tb->poff = tb->off + nch;
    tb->lo = lo->buf; tb->n = n->buf; tb->freq = freq->buf;
    if (table_offsets(lo->buf, n->buf, freq->buf, freq->len, nch, prof, tb->off) < 0) return -1;
    if (!prof) return 0;
    tb->plo = plo->buf; tb->pn = pn->buf; tb->pfreq = pfreq->buf;
    for (Py_ssize_t c = 0; c < nch; c++)
        if (tb->pn[c] == 0) return fail("a profile table is empty");
    if (table_offsets(plo->buf, pn->buf, pfreq->buf, pfreq->len, nch, 0, tb->poff) < 0) return -1;
    return 0;
}

/* Coding table of channel ch (cumulative frequencies and the decoder's 256-bucket index). */
static void ctab_build(const tables_t *tb, size_t ch, ctab_t *t) {
    const uint8_t *f;
    if (tb->n[ch] == 0) { t->lo = tb->plo[ch]; t->n = tb->pn[ch]; f = tb->pfreq + tb->poff[ch]; }
    else { t->lo = tb->lo[ch]; t->n = tb->n[ch]; f = tb->freq + tb->off[ch]; }
    t->cum[0] = 0;
    if (t->n == 1) t->cum[1] = CG_M;
    else for (int i = 0; i < t->n; i++) t->cum[i + 1] = t->cum[i] + ld16(f + 2 * i);
    int k = 0;
    for (uint32_t b = 0; b < 256; b++) {
        while (t->cum[k + 1] <= (b << 8)) k++;
        t->bucket[b] = (uint8_t)k;
    }
}

/* ---------------------------------------------------------------- range encoder */

typedef struct {
    uint64_t low;
    uint32_t range;
    uint8_t cache;
    uint64_t cache_size;
    uint8_t *out;
    size_t pos;
    int first;
} enc_t;

static inline void enc_put(enc_t *e, uint8_t b) {
    if (e->first) { e->first = 0; return; }  /* the first byte is always 0: not written */
    e->out[e->pos++] = b;
}

static inline void enc_shift_low(enc_t *e) {
    if ((uint32_t)e->low < 0xFF000000u || (e->low >> 32) != 0) {
        uint8_t carry = (uint8_t)(e->low >> 32), temp = e->cache;
        do {
            enc_put(e, (uint8_t)(temp + carry));
            temp = 0xFF;
        } while (--e->cache_size != 0);
        e->cache = (uint8_t)(e->low >> 24);
    }
    e->cache_size++;
    e->low = (e->low & 0x00FFFFFFu) << 8;
}

static inline void enc_symbol(enc_t *e, uint32_t cum, uint32_t hi) {
    uint32_t r = e->range >> 16;
    e->low += (uint64_t)r * cum;
    e->range = hi == CG_M ? e->range - r * cum : r * (hi - cum);
    while (e->range < CG_TOP) {
        e->range <<= 8;
        enc_shift_low(e);
    }
}

typedef struct {
    const uint8_t *sym;
    geom_t g;
    Py_ssize_t tq, gps;  /* quantized tokens, groups (streams) per slab */
    tables_t tb;
    ctab_t *tabs;                /* CG_LANES * gw tables, gw = min(group, channels) */
    float *muf, *stf;            /* CG_LANES * gw means and steps (decoding) */
    uint8_t *row;                /* CG_LANES * gw symbols of the current token */
    Py_ssize_t gw;
} stream_job_t;

/* Encodes stream j into out; returns its length, or (size_t)-1 for a symbol its table lacks. */
static size_t encode_one(stream_job_t *J, Py_ssize_t j, uint8_t *out) {
    Py_ssize_t s = j / J->gps, c0 = (j % J->gps) * J->g.group, C = J->g.channels;
    int w = (int)((c0 + J->g.group <= C) ? J->g.group : C - c0);
    for (int k = 0; k < w; k++) ctab_build(&J->tb, (size_t)s * C + c0 + k, &J->tabs[k]);
    enc_t e = {0, 0xFFFFFFFFu, 0, 1, out, 0, 1};
    const uint8_t *row = J->sym + (size_t)s * J->tq * C + c0;
    for (Py_ssize_t t = 0; t < J->tq; t++, row += C) {
        for (int k = 0; k < w; k++) {
            const ctab_t *tb = &J->tabs[k];
            unsigned i = (unsigned)row[k] - tb->lo;
            if (i >= tb->n || tb->cum[i + 1] == tb->cum[i]) return (size_t)-1;
            enc_symbol(&e, tb->cum[i], tb->cum[i + 1]);
        }
    }
    for (int i = 0; i < 5; i++) enc_shift_low(&e);
    return e.pos;
}

static int parse_stream_args(PyObject *args, int decode, Py_buffer *b, geom_t *g, PyObject **opt) {
    /* b: [0] symbols or data, [1] offsets (decode only), [2] lo, [3] n, [4] freq */
    memset(g, 0, sizeof *g);
    if (decode)
        return PyArg_ParseTuple(args, "y*y*nnnny*y*y*OOO", &b[0], &b[1], &g->slabs, &g->tokens, &g->channels,
                                &g->group, &b[2], &b[3], &b[4], &opt[0], &opt[1], &opt[2]);
    b[1].obj = NULL;
    return PyArg_ParseTuple(args, "y*nnnny*y*y*OOO", &b[0], &g->slabs, &g->tokens, &g->channels, &g->group,
                            &b[2], &b[3], &b[4], &opt[0], &opt[1], &opt[2]);
}

static int stream_job_init(stream_job_t *J, Py_buffer *b, Py_buffer *p, const geom_t *g, Py_ssize_t *nch) {
    memset(J, 0, sizeof *J);
    J->g = *g;
    J->tq = g->tokens - g->exact;
    if (check_geom(g) < 0 || mul(g->slabs, g->channels, nch) < 0) return -1;
    J->gps = (g->channels + g->group - 1) / g->group;
    if (tables_init(&J->tb, &b[2], &b[3], &b[4], &p[0], &p[1], &p[2], *nch) < 0) return -1;
    J->gw = g->group < g->channels ? g->group : g->channels;
    size_t n = (size_t)CG_LANES * (size_t)J->gw;
    J->tabs = PyMem_Malloc(sizeof(ctab_t) * n);
    J->muf = PyMem_Malloc(2 * sizeof(float) * n);
    J->row = PyMem_Malloc(n);
    if (J->tabs == NULL || J->muf == NULL || J->row == NULL) { PyErr_NoMemory(); return -1; }
    J->stf = J->muf + n;
    return 0;
}

static void stream_job_free(stream_job_t *J) {
    PyMem_Free(J->tb.off);
    PyMem_Free(J->tabs);
    PyMem_Free(J->muf);
    PyMem_Free(J->row);
}

static PyObject *py_encode_streams(PyObject *self, PyObject *args) {
    Py_buffer b[5], p[3] = {{0}};
    PyObject *opt[3];
    geom_t g;
    if (!parse_stream_args(args, 0, b, &g, opt)) return NULL;
    PyObject *result = NULL;
    stream_job_t J;
    memset(&J, 0, sizeof J);
    uint8_t *data = NULL, *offs = NULL;
    Py_ssize_t nch, nq, nstreams;
    size_t total = 0;
    int bad = 0;
    for (int i = 0; i < 3; i++)
        if (get_opt_buffer(opt[i], &p[i], 0) < 0) goto out;
    if (stream_job_init(&J, b, p, &g, &nch) < 0 || mul(nch, g.tokens, &nq) < 0) goto out;
    if (b[0].len != nq) { fail("symbols buffer has the wrong size"); goto out; }
    J.sym = b[0].buf;
    nstreams = g.slabs * J.gps;
    data = PyMem_Malloc(2 * (size_t)nq + 8 * (size_t)nstreams);  /* <= 2 bytes per symbol + 4 flush */
    offs = PyMem_Malloc(4 * (size_t)nstreams);
    if (data == NULL || offs == NULL) { PyErr_NoMemory(); goto out; }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < nstreams; j++) {
        size_t len = encode_one(&J, j, data + total);
        if (len == (size_t)-1 || total + len > 0xFFFFFFFFu) { bad = 1; break; }
        total += len;
        st32(offs + 4 * j, (uint32_t)total);
    }
    Py_END_ALLOW_THREADS
    if (bad) { fail("a symbol has no frequency in its table (or streams exceed 4 GiB)"); goto out; }
    result = Py_BuildValue("y#y#", (const char *)offs, 4 * nstreams, (const char *)data, (Py_ssize_t)total);
out:
    stream_job_free(&J);
    PyMem_Free(data); PyMem_Free(offs);
    for (int i = 0; i < 5; i++) release(&b[i]);
    for (int i = 0; i < 3; i++) release(&p[i]);
    return result;
}

/* ---------------------------------------------------------------- range decoder */

typedef struct {
    const uint8_t *dq_mu, *dq_step;  /* qparams when dequantizing, else NULL */
    uint8_t *out;                    /* symbols [slabs][tq][C] or values [slabs][tokens][C] */
    int dtype;
    const int8_t *tcodes;            /* NULL, or step codes [slabs][tq] when dequantizing */
} sink_t;

/* One stream being decoded: its bytes, coder state, tables and the current token's symbols. */
typedef struct {
    const uint8_t *p;
    size_t len, pos, out0;  /* out0: the stream's first output element (values) or symbol */
    uint32_t range, code, bad;
    int w;
    const ctab_t *tabs;
    float *muf, *stf;
    uint8_t *row;
    const int8_t *tcodes;  /* the slab's step codes, or NULL */
} lane_t;

static void lane_init(stream_job_t *J, Py_ssize_t j, const uint8_t *p, size_t len, const sink_t *sk, int slot,
                      lane_t *L) {
    Py_ssize_t s = j / J->gps, c0 = (j % J->gps) * J->g.group, C = J->g.channels, G = J->g.group;
    size_t ch0 = (size_t)s * C + c0, base = (size_t)slot * (size_t)J->gw;
    ctab_t *tabs = J->tabs + base;
    L->w = (int)((c0 + G <= C) ? G : C - c0);
    L->tabs = tabs;
    L->muf = J->muf + base;
    L->stf = J->stf + base;
    L->row = J->row + base;
    for (int k = 0; k < L->w; k++) ctab_build(&J->tb, ch0 + k, &tabs[k]);
    if (sk->dq_mu)
        for (int k = 0; k < L->w; k++) {
            L->muf[k] = u2f((uint32_t)ld16(sk->dq_mu + 2 * (ch0 + k)) << 16);
            L->stf[k] = u2f((uint32_t)ld16(sk->dq_step + 2 * (ch0 + k)) << 16);
        }
    L->out0 = sk->dq_mu ? ((size_t)s * J->g.tokens + J->g.exact) * C + c0 : (size_t)s * J->tq * C + c0;
    L->tcodes = sk->tcodes ? sk->tcodes + (size_t)s * (size_t)J->tq : NULL;
    L->p = p;
    L->len = len;
    L->pos = 0;
    L->range = 0xFFFFFFFFu;
    L->code = 0;
    L->bad = 0;
    for (int i = 0; i < 4; i++) L->code = (L->code << 8) | (L->pos < len ? p[L->pos] : 0), L->pos++;
}

static inline uint8_t lane_symbol(lane_t *L, const ctab_t *tb) {
    uint32_t r = L->range >> 16, v = L->code / r;
    if (v > 0xFFFFu) v = 0xFFFFu;
    uint32_t i = tb->bucket[v >> 8];
    while (tb->cum[i + 1] <= v) i++;
    uint32_t cum = tb->cum[i], hi = tb->cum[i + 1];
    L->code -= r * cum;
    L->range = hi == CG_M ? L->range - r * cum : r * (hi - cum);
    L->bad |= L->code >= L->range;
    while (L->range < CG_TOP) {
        L->range <<= 8;
        L->code = (L->code << 8) | (L->pos < L->len ? L->p[L->pos] : 0);
        L->pos++;
    }
    return (uint8_t)(tb->lo + i);
}

/* Writes the token's decoded row: values (dequantized) or symbols. */
static void lane_emit(const lane_t *L, Py_ssize_t t, Py_ssize_t C, const sink_t *sk) {
    size_t o = L->out0 + (size_t)t * C;
    if (!sk->dq_mu) {
        memcpy(sk->out + o, L->row, (size_t)L->w);
        return;
    }
    if (L->tcodes) {
        float m = tmult(L->tcodes[t]);
        for (int k = 0; k < L->w; k++) {
            float step = L->stf[k] * m;  /* exact: two bfloat16 values */
            store_value(sk->out, sk->dtype, o + k, L->muf[k] + (float)((int)L->row[k] - CG_QMAX) * step);
        }
        return;
    }
    for (int k = 0; k < L->w; k++)
        store_value(sk->out, sk->dtype, o + k, L->muf[k] + (float)((int)L->row[k] - CG_QMAX) * L->stf[k]);
}

static inline int lane_ok(const lane_t *L) { return !L->bad && L->pos == L->len; }

/* Decodes `lanes` streams token by token; CG_LANES of equal width go symbol by symbol side by side,
 * so their divisions and table lookups overlap. Returns the first corrupt lane, or -1. */
static int decode_lanes(stream_job_t *J, lane_t *L, const sink_t *sk, int lanes) {
    Py_ssize_t C = J->g.channels;
    int side_by_side = lanes == CG_LANES;
    for (int l = 1; l < lanes; l++) side_by_side &= L[l].w == L[0].w;
    for (Py_ssize_t t = 0; t < J->tq; t++) {
        if (side_by_side) {
            for (int k = 0; k < L[0].w; k++)
                for (int l = 0; l < CG_LANES; l++) L[l].row[k] = lane_symbol(&L[l], &L[l].tabs[k]);
        } else {
            for (int l = 0; l < lanes; l++)
                for (int k = 0; k < L[l].w; k++) L[l].row[k] = lane_symbol(&L[l], &L[l].tabs[k]);
        }
        for (int l = 0; l < lanes; l++) lane_emit(&L[l], t, C, sk);
    }
    for (int l = 0; l < lanes; l++)
        if (!lane_ok(&L[l])) return l;
    return -1;
}

/* Stream ends from the offsets table: non-decreasing, the last one the data length. */
static int check_offsets(const Py_buffer *offs, Py_ssize_t nstreams, Py_ssize_t dlen) {
    if (offs->len != 4 * nstreams) return fail("stream table has the wrong number of entries");
    uint32_t prev = 0;
    for (Py_ssize_t j = 0; j < nstreams; j++) {
        uint32_t end = ld32((const uint8_t *)offs->buf + 4 * j);
        if (end < prev) return fail("stream table offsets decrease");
        prev = end;
    }
    if ((Py_ssize_t)prev != dlen) return fail("stream table does not end at the end of the stream data");
    return 0;
}

static int decode_all(stream_job_t *J, Py_buffer *data, Py_buffer *offs, const sink_t *sk) {
    Py_ssize_t nstreams = J->g.slabs * J->gps;
    if (check_offsets(offs, nstreams, data->len) < 0) return -1;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    lane_t L[CG_LANES];
    uint32_t start = 0;
    for (Py_ssize_t j = 0; j < nstreams && bad < 0; j += CG_LANES) {
        int lanes = (int)(nstreams - j < CG_LANES ? nstreams - j : CG_LANES);
        for (int l = 0; l < lanes; l++) {
            uint32_t end = ld32((const uint8_t *)offs->buf + 4 * (j + l));
            lane_init(J, j + l, (const uint8_t *)data->buf + start, end - start, sk, l, &L[l]);
            start = end;
        }
        int failed = decode_lanes(J, L, sk, lanes);
        if (failed >= 0) bad = j + failed;
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "cachegen stream %zd is corrupt (bytes left over, missing or inconsistent)",
                     bad);
        return -1;
    }
    return 0;
}

static PyObject *py_decode_symbols(PyObject *self, PyObject *args) {
    Py_buffer b[5], p[3] = {{0}};
    PyObject *opt[3];
    geom_t g;
    if (!parse_stream_args(args, 1, b, &g, opt)) return NULL;
    PyObject *result = NULL;
    stream_job_t J;
    memset(&J, 0, sizeof J);
    Py_ssize_t nch, nq;
    for (int i = 0; i < 3; i++)
        if (get_opt_buffer(opt[i], &p[i], 0) < 0) goto out;
    if (stream_job_init(&J, b, p, &g, &nch) < 0 || mul(nch, g.tokens, &nq) < 0) goto out;
    result = PyBytes_FromStringAndSize(NULL, nq);
    if (result == NULL) goto out;
    sink_t sk = {NULL, NULL, (uint8_t *)PyBytes_AS_STRING(result), 0, NULL};
    if (decode_all(&J, &b[0], &b[1], &sk) < 0) Py_CLEAR(result);
out:
    stream_job_free(&J);
    for (int i = 0; i < 5; i++) release(&b[i]);
    for (int i = 0; i < 3; i++) release(&p[i]);
    return result;
}

static PyObject *py_decode_chunk(PyObject *self, PyObject *args) {
    Py_buffer b[5], p[3] = {{0}}, qp, out, ts = {0};
    PyObject *opt[3], *ts_o;
    int dtype;
    geom_t g;
    memset(&g, 0, sizeof g);
    if (!PyArg_ParseTuple(args, "y*y*nnnnny*y*y*OOOy*iw*O", &b[0], &b[1], &g.slabs, &g.tokens, &g.channels,
                          &g.exact, &g.group, &b[2], &b[3], &b[4], &opt[0], &opt[1], &opt[2], &qp, &dtype, &out,
                          &ts_o))
        return NULL;
    PyObject *result = NULL;
    stream_job_t J;
    memset(&J, 0, sizeof J);
    Py_ssize_t nch, numel, nts;
    int have_ts = 0;
    for (int i = 0; i < 3; i++)
        if (get_opt_buffer(opt[i], &p[i], 0) < 0) goto out;
    if (stream_job_init(&J, b, p, &g, &nch) < 0 || mul(nch, g.tokens, &numel) < 0) goto out;
    if (mul(g.slabs, g.tokens - g.exact, &nts) < 0 || (have_ts = get_tscale(ts_o, &ts, nts)) < 0) goto out;
    if (dtype < 0 || dtype > 2 || out.len < numel * itemsize_of(dtype) || qp.len != 4 * nch) {
        fail("output or qparams buffer has the wrong size");
        goto out;
    }
    if (check_qparams(qp.buf, nch, have_ts) < 0) goto out;
    sink_t sk = {qp.buf, (const uint8_t *)qp.buf + 2 * nch, out.buf, dtype, have_ts ? ts.buf : NULL};
    if (decode_all(&J, &b[0], &b[1], &sk) == 0) result = Py_NewRef(Py_None);
out:
    stream_job_free(&J);
    for (int i = 0; i < 5; i++) release(&b[i]);
    for (int i = 0; i < 3; i++) release(&p[i]);
    PyBuffer_Release(&qp);
    PyBuffer_Release(&out);
    release(&ts);
    return result;
}

/* ---------------------------------------------------------------- RoPE (un)rotation of keys */

/* Rotates (direction 1) or un-rotates (0) the pairs (d, d + D/2) of every head of every K slab
 * (even slabs when kv_factor is 2) of tokens exact..tokens-1 by the angles whose (cos, sin) the
 * table holds ([tokens][D/2][2] float32); other slabs are copied. src and dst may differ in dtype.
 * Each product is rounded on its own (no FMA), so the CUDA kernel gives the same bits. */
static void rope_slab(const uint8_t *src, int sdt, uint8_t *dst, int ddt, const geom_t *g, Py_ssize_t s,
                      Py_ssize_t heads, Py_ssize_t dim, const float *cs, int rotate, int key) {
    Py_ssize_t C = g->channels, half = dim / 2;
    for (Py_ssize_t t = g->exact; t < g->tokens; t++) {
        size_t row = ((size_t)s * (size_t)g->tokens + (size_t)t) * (size_t)C;
        if (!key) {
            for (Py_ssize_t c = 0; c < C; c++) store_value(dst, ddt, row + c, load_value(src, sdt, row + c));
            continue;
        }
        const float *ct = cs + (size_t)t * (size_t)half * 2;
        for (Py_ssize_t h = 0; h < heads; h++) {
            size_t b = row + (size_t)h * (size_t)dim;
            for (Py_ssize_t d = 0; d < half; d++) {
                float x1 = load_value(src, sdt, b + d), x2 = load_value(src, sdt, b + half + d);
                float c = ct[2 * d], sn = ct[2 * d + 1];
                float p1 = x1 * c, p2 = x2 * sn, p3 = x2 * c, p4 = x1 * sn;
                store_value(dst, ddt, b + d, rotate ? p1 - p2 : p1 + p2);
                store_value(dst, ddt, b + half + d, rotate ? p3 + p4 : p3 - p4);
            }
        }
    }
}

static PyObject *py_rope(PyObject *self, PyObject *args) {
    Py_buffer src, dst, table;
    int sdt, ddt, kv_factor, rotate;
    Py_ssize_t heads, dim;
    geom_t g = {0, 0, 0, 0, 1};
    if (!PyArg_ParseTuple(args, "y*iw*innnnniy*p", &src, &sdt, &dst, &ddt, &g.slabs, &g.tokens, &g.exact, &heads,
                          &dim, &kv_factor, &table, &rotate))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t nch, numel, cells;
    g.channels = heads * dim;
    if (heads < 1 || dim < 2 || dim % 2 || heads > (1 << 20) || dim > (1 << 20)) {
        fail("rope needs heads >= 1 and an even head_dim");
        goto out;
    }
    if (check_geom(&g) < 0 || mul(g.slabs, g.channels, &nch) < 0 || mul(nch, g.tokens, &numel) < 0 ||
        mul(g.tokens, dim, &cells) < 0)
        goto out;
    if (sdt < 0 || sdt > 2 || ddt < 0 || ddt > 2 || (kv_factor != 1 && kv_factor != 2) ||
        src.len != numel * itemsize_of(sdt) || dst.len != numel * itemsize_of(ddt) || table.len != 4 * cells) {
        fail("rope buffers do not match the geometry");
        goto out;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < g.slabs; s++)
        rope_slab(src.buf, sdt, dst.buf, ddt, &g, s, heads, dim, table.buf, rotate, kv_factor == 2 && s % 2 == 0);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&table);
    return result;
}

/* ---------------------------------------------------------------- per-head linear transform */

#define CG_TBLOCK 16
#define CG_TTOK 4
/* 8 floats, unaligned: lane-wise IEEE float32 operations (GCC/clang vector extension) */
typedef float cg_v8 __attribute__((vector_size(32), aligned(4)));

/* dst[t, h, :] = M[s][h] @ src[t, h, :] (float32) for tokens exact..tokens-1 of every slab s and head
 * h; matrices are [slabs][heads][D][D] float32, row d holding output d's coefficients. Without
 * `live`, output d is acc = +0, then acc = acc + M[d][e] * x[e] for e = 0..D-1 in order. With
 * `live` (one byte per (slab, channel): 0 means the channel holds one value over the tokens, that
 * of token `exact`), acc starts at c[d] (+0, then c[d] + M[d][e] * x[e] over the constant e in
 * order) and adds the live e in order. Every product and sum is rounded on its own (no FMA): the
 * CUDA kernel cg_transform computes the same bits. The loops run over d inside (a transposed copy
 * of the live columns), which changes no output's order of operations. */
__attribute__((target_clones("avx2", "default")))
static void transform_head(const float *src, float *dst, const geom_t *g, size_t b0, Py_ssize_t dim,
                           const float *m, const uint8_t *live, float *mt, float *c, Py_ssize_t *idx) {
    Py_ssize_t k = 0, C = g->channels;
    for (Py_ssize_t d = 0; d < dim; d++) c[d] = 0.0f;
    const float *x0 = src + b0 + (size_t)g->exact * (size_t)C;
    for (Py_ssize_t e = 0; e < dim; e++) {
        if (live == NULL || live[e]) {
            for (Py_ssize_t d = 0; d < dim; d++) mt[k * dim + d] = m[d * dim + e];
            idx[k++] = e;
        } else {
            for (Py_ssize_t d = 0; d < dim; d++) c[d] = c[d] + m[d * dim + e] * x0[e];
        }
    }
    Py_ssize_t t = g->exact;
    if (dim % CG_TBLOCK == 0)  /* CG_TTOK tokens at a time: each column loaded once for all of them */
        for (; t + CG_TTOK <= g->tokens; t += CG_TTOK) {
            const float *x = src + b0 + (size_t)t * (size_t)C;
            float *y = dst + b0 + (size_t)t * (size_t)C;
            for (Py_ssize_t d0 = 0; d0 < dim; d0 += CG_TBLOCK) {
                cg_v8 a[CG_TTOK][2];
                for (int u = 0; u < CG_TTOK; u++) {
                    a[u][0] = *(const cg_v8 *)(c + d0);
                    a[u][1] = *(const cg_v8 *)(c + d0 + 8);
                }
                for (Py_ssize_t i = 0; i < k; i++) {
                    const cg_v8 m0 = *(const cg_v8 *)(mt + i * dim + d0), m1 = *(const cg_v8 *)(mt + i * dim + d0 + 8);
                    for (int u = 0; u < CG_TTOK; u++) {
                        const float xe = x[(size_t)u * (size_t)C + (size_t)idx[i]];
                        const cg_v8 xv = {xe, xe, xe, xe, xe, xe, xe, xe};
                        a[u][0] = a[u][0] + m0 * xv;
                        a[u][1] = a[u][1] + m1 * xv;
                    }
                }
                for (int u = 0; u < CG_TTOK; u++) {
                    *(cg_v8 *)(y + (size_t)u * (size_t)C + (size_t)d0) = a[u][0];
                    *(cg_v8 *)(y + (size_t)u * (size_t)C + (size_t)d0 + 8) = a[u][1];
                }
            }
        }
    for (; t < g->tokens; t++) {
        const size_t row = b0 + (size_t)t * (size_t)C;
        const float *x = src + row;
        float *y = dst + row;
        Py_ssize_t d0 = 0;
        for (; d0 + CG_TBLOCK <= dim; d0 += CG_TBLOCK) {
            float a[CG_TBLOCK];
            for (int j = 0; j < CG_TBLOCK; j++) a[j] = c[d0 + j];
            for (Py_ssize_t i = 0; i < k; i++) {
                const float xe = x[idx[i]], *col = mt + i * dim + d0;
                for (int j = 0; j < CG_TBLOCK; j++) a[j] = a[j] + col[j] * xe;
            }
            for (int j = 0; j < CG_TBLOCK; j++) y[d0 + j] = a[j];
        }
        for (; d0 < dim; d0++) {
            float a = c[d0];
            for (Py_ssize_t i = 0; i < k; i++) a = a + mt[i * dim + d0] * x[idx[i]];
            y[d0] = a;
        }
    }
}

static PyObject *py_transform(PyObject *self, PyObject *args) {
    Py_buffer src, dst, mats, live = {0};
    Py_ssize_t heads, dim, nch, numel, nmat, cells;
    PyObject *live_obj;
    geom_t g = {0, 0, 0, 0, 1};
    if (!PyArg_ParseTuple(args, "y*w*nnnnny*O", &src, &dst, &g.slabs, &g.tokens, &g.exact, &heads, &dim, &mats,
                          &live_obj))
        return NULL;
    PyObject *result = NULL;
    uint8_t *scratch = NULL;
    if (get_opt_buffer(live_obj, &live, 0) < 0) goto out;
    if (heads < 1 || dim < 1 || heads > (1 << 20) || dim > 4096) {
        fail("transform needs heads >= 1 and 1 <= head_dim <= 4096");
        goto out;
    }
    g.channels = heads * dim;
    if (check_geom(&g) < 0 || mul(g.slabs, g.channels, &nch) < 0 || mul(nch, g.tokens, &numel) < 0 ||
        mul(g.slabs, heads, &nmat) < 0 || mul(nmat, dim * dim, &cells) < 0)
        goto out;
    if (src.len != numel * 4 || dst.len != numel * 4 || mats.len != cells * 4 || src.buf == dst.buf ||
        (live.obj != NULL && live.len != nch)) {
        fail("transform buffers do not match the geometry");
        goto out;
    }
    size_t dd = (size_t)dim * (size_t)dim;
    scratch = PyMem_RawMalloc((dd + (size_t)dim) * sizeof(float) + (size_t)dim * sizeof(Py_ssize_t));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    float *mt = (float *)scratch, *c = mt + dd;
    Py_ssize_t *idx = (Py_ssize_t *)(c + dim);
    const uint8_t *lv = live.obj != NULL ? live.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t s = 0; s < g.slabs; s++)
        for (Py_ssize_t h = 0; h < heads; h++) {
            size_t b0 = (size_t)s * (size_t)g.tokens * (size_t)g.channels + (size_t)h * (size_t)dim;
            const float *m = (const float *)mats.buf + ((size_t)s * (size_t)heads + (size_t)h) * dd;
            transform_head(src.buf, dst.buf, &g, b0, dim, m, lv ? lv + (size_t)s * g.channels + h * dim : NULL,
                           mt, c, idx);
        }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
out:
    PyMem_RawFree(scratch);
    release(&live);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&mats);
    return result;
}

static PyMethodDef methods[] = {
    {"rope", py_rope, METH_VARARGS, "Rotate or un-rotate the keys of a chunk by a (cos, sin) table."},
    {"transform", py_transform, METH_VARARGS, "Apply a matrix per (slab, head) to every token of a float32 chunk."},
    {"token_codes", py_token_codes, METH_VARARGS, "Per-(slab, token) step codes of a chunk (format 4)."},
    {"quant_params", py_quant_params, METH_VARARGS, "Per-channel (mean, step) bfloat16 pairs of a chunk."},
    {"quantize", py_quantize, METH_VARARGS, "Symbols and frequency tables of a chunk."},
    {"histogram", py_histogram, METH_VARARGS, "Per-channel symbol counts."},
    {"encode_streams", py_encode_streams, METH_VARARGS, "Range-code every stream: (offsets, data)."},
    {"decode_symbols", py_decode_symbols, METH_VARARGS, "Decode every stream back to symbols."},
    {"decode_chunk", py_decode_chunk, METH_VARARGS, "Decode and dequantize every stream into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvstore._rangecoder",
                                    "CacheGen quantizer and range coder (docs/codecs.md, cachegen).", -1, methods};

PyMODINIT_FUNC PyInit__rangecoder(void) { return PyModule_Create(&module); }
