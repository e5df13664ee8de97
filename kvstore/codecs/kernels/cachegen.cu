// CacheGen kernels: the arithmetic of kvstore/native/rangecoder.c, bit for bit, on a GPU.
//
// Loaded by kvstore/codecs/cachegen_gpu.py with cupy.RawModule (NVRTC, --fmad=false); compiles
// standalone with `nvcc -std=c++17 -arch=sm_90 -c` and needs no header. Every kernel is a
// grid-stride loop over its work items (one channel, one slab, one value or one stream each), so
// any launch shape gives the same bytes; defining CG_EMULATE compiles the same file as plain C++
// whose kernels run the whole loop on the CPU (tests/codecs/test_cachegen_gpu.py checks the
// orchestration and the arithmetic that way where no GPU is present).
//
// Bit-identity with the C coder rests on: statistics summed sequentially in token order, in
// double; products either exact (x*x of a float, q*step of 7 and 8 significant bits) or rounded
// on their own (explicit _rn intrinsics, never contracted into an FMA); IEEE division and square
// root; floorf and fabsf (exact); conversions done with integer bit operations.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define CG_M 65536u
#define CG_NSYM 255
#define CG_QMAX 127
#define CG_TOP (1u << 24)

#ifdef CG_EMULATE
#include <math.h>
#include <string.h>
#define CG_DEV static inline
#define CG_KERNEL extern "C"
static inline i64 cg_first() { return 0; }
static inline i64 cg_stride() { return 1; }
static inline u32 cg_f2u(float f) { u32 u; memcpy(&u, &f, 4); return u; }
static inline float cg_u2f(u32 u) { float f; memcpy(&f, &u, 4); return f; }
static inline float cg_fsub(float a, float b) { return a - b; }
static inline float cg_fadd(float a, float b) { return a + b; }
static inline float cg_fmul(float a, float b) { return a * b; }
static inline float cg_fdiv(float a, float b) { return a / b; }
static inline double cg_dadd(double a, double b) { return a + b; }
static inline double cg_dsub(double a, double b) { return a - b; }
static inline double cg_dmul(double a, double b) { return a * b; }
static inline double cg_ddiv(double a, double b) { return a / b; }
static inline double cg_dsqrt(double a) { return sqrt(a); }
static inline float cg_d2f(double a) { return (float)a; }
static inline u64 cg_d2u(double d) { u64 u; memcpy(&u, &d, 8); return u; }
static inline double cg_u2d(u64 u) { double d; memcpy(&d, &u, 8); return d; }
#else
#define CG_DEV __device__ __forceinline__
#define CG_KERNEL extern "C" __global__
CG_DEV i64 cg_first() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
CG_DEV i64 cg_stride() { return (i64)gridDim.x * blockDim.x; }
CG_DEV u32 cg_f2u(float f) { return __float_as_uint(f); }
CG_DEV float cg_u2f(u32 u) { return __uint_as_float(u); }
CG_DEV float cg_fsub(float a, float b) { return __fsub_rn(a, b); }
CG_DEV float cg_fadd(float a, float b) { return __fadd_rn(a, b); }
CG_DEV float cg_fmul(float a, float b) { return __fmul_rn(a, b); }
CG_DEV float cg_fdiv(float a, float b) { return __fdiv_rn(a, b); }
CG_DEV double cg_dadd(double a, double b) { return __dadd_rn(a, b); }
CG_DEV double cg_dsub(double a, double b) { return __dsub_rn(a, b); }
CG_DEV double cg_dmul(double a, double b) { return __dmul_rn(a, b); }
CG_DEV double cg_ddiv(double a, double b) { return __ddiv_rn(a, b); }
CG_DEV double cg_dsqrt(double a) { return __dsqrt_rn(a); }
CG_DEV float cg_d2f(double a) { return __double2float_rn(a); }
CG_DEV u64 cg_d2u(double d) { return (u64)__double_as_longlong(d); }
CG_DEV double cg_u2d(u64 u) { return __longlong_as_double((long long)u); }
#endif

#define CG_FOR(i, n) for (i64 i = cg_first(); i < (i64)(n); i += cg_stride())

// ------------------------------------------------------------------ float formats

CG_DEV int finite_f32(float f) { return (cg_f2u(f) & 0x7F800000u) != 0x7F800000u; }

CG_DEV float f16_to_f32(u16 h) {
    u32 sign = (u32)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return cg_u2f(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return cg_u2f(sign);
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        return cg_u2f(sign | (e << 23) | ((m & 0x3FF) << 13));
    }
    return cg_u2f(sign | ((e + 112) << 23) | (m << 13));
}

CG_DEV u16 f32_to_f16(float f) {
    u32 x = cg_f2u(f), sign = (x >> 16) & 0x8000;
    x &= 0x7FFFFFFFu;
    if (x >= 0x7F800000u) return (u16)(sign | (x > 0x7F800000u ? 0x7E00 : 0x7C00));
    if (x >= 0x477FF000u) return (u16)(sign | 0x7C00);
    if (x < 0x38800000u) {
        u32 e = x >> 23, m = (x & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
        if (e < 102) return (u16)sign;
        u32 res = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (res & 1))) res++;
        return (u16)(sign | res);
    }
    x += 0xFFFu + ((x >> 13) & 1);
    return (u16)(sign | ((x - 0x38000000u) >> 13));
}

CG_DEV u16 f32_to_bf16(float f) {
    u32 u = cg_f2u(f);
    return (u16)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

CG_DEV u16 f32_to_bf16_up(float f) {
    u32 u = cg_f2u(f);
    if (u & 0xFFFFu) u += 0x10000u;
    return (u16)(u >> 16);
}

CG_DEV float bf16_to_f32(u16 b) { return cg_u2f((u32)b << 16); }

CG_DEV float load_value(const u8 *src, int dtype, u64 i) {
    if (dtype == 0) return bf16_to_f32((u16)(src[2 * i] | (src[2 * i + 1] << 8)));
    if (dtype == 1) return f16_to_f32((u16)(src[2 * i] | (src[2 * i + 1] << 8)));
    return cg_u2f((u32)src[4 * i] | ((u32)src[4 * i + 1] << 8) | ((u32)src[4 * i + 2] << 16) |
               ((u32)src[4 * i + 3] << 24));
}

CG_DEV void store_value(u8 *dst, int dtype, u64 i, float y) {
    if (dtype == 2) {
        u32 u = cg_f2u(y);
        dst[4 * i] = (u8)u; dst[4 * i + 1] = (u8)(u >> 8); dst[4 * i + 2] = (u8)(u >> 16); dst[4 * i + 3] = (u8)(u >> 24);
        return;
    }
    u16 h = dtype == 0 ? f32_to_bf16(y) : f32_to_f16(y);
    dst[2 * i] = (u8)h;
    dst[2 * i + 1] = (u8)(h >> 8);
}

// ------------------------------------------------------------------ quantization

// One thread per (slab, channel): sums, sums of squares, min and max over the quantized tokens.
CG_KERNEL void cg_stats(const u8 *src, int dtype, i64 slabs, i64 tokens, i64 channels, i64 exact, double *sum,
                        double *sumsq, float *mn, float *mx, int *bad) {
    CG_FOR(ch, slabs * channels) {
        i64 s = ch / channels, c = ch % channels;
        double a = 0.0, b = 0.0;
        float lo = cg_u2f(0x7F800000u), hi = cg_u2f(0xFF800000u);
        for (i64 t = exact; t < tokens; t++) {
            float x = load_value(src, dtype, (u64)((s * tokens + t) * channels + c));
            if (!finite_f32(x)) { bad[0] = 1; break; }
            double xd = (double)x;
            a = cg_dadd(a, xd);
            b = cg_dadd(b, cg_dmul(xd, xd));
            if (x < lo) lo = x;
            if (x > hi) hi = x;
        }
        sum[ch] = a; sumsq[ch] = b; mn[ch] = lo; mx[ch] = hi;
    }
}

// ------------------------------------------------------------------ per-token step scales (format 4)

#define CG_TCODE_MAX 8
#define CG_TSTEP_MAX_EXP 0x7E00  // with token codes a step is below 2^126: 4 times it is finite
#define CG_NO_NORM (-(i64)1 << 62)

// bfloat16(2^(k/4)) for k = -8..8 as float bits (every product with a bfloat16 step is exact).
CG_DEV float tmult(int k) {
    switch (k) {
        case -8: return cg_u2f(0x3e800000u); case -7: return cg_u2f(0x3e980000u);
        case -6: return cg_u2f(0x3eb50000u); case -5: return cg_u2f(0x3ed70000u);
        case -4: return cg_u2f(0x3f000000u); case -3: return cg_u2f(0x3f180000u);
        case -2: return cg_u2f(0x3f350000u); case -1: return cg_u2f(0x3f570000u);
        case 1: return cg_u2f(0x3f980000u); case 2: return cg_u2f(0x3fb50000u);
        case 3: return cg_u2f(0x3fd70000u); case 4: return cg_u2f(0x40000000u);
        case 5: return cg_u2f(0x40180000u); case 6: return cg_u2f(0x40350000u);
        case 7: return cg_u2f(0x40570000u); case 8: return cg_u2f(0x40800000u);
        default: return 1.0f;
    }
}

// round(4 * log2 n) of a positive normal double, rounded against 2^((2i + 1) / 8) on the mantissa.
CG_DEV i64 quarter_octave(double n) {
    u64 b = cg_d2u(n);
    i64 e = (i64)((b >> 52) & 0x7FF) - 1023;
    double m = cg_u2d((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
    int j = (m >= cg_u2d(0x3ff172b83c7d517bull)) + (m >= cg_u2d(0x3ff4bfdad5362a27ull)) +
            (m >= cg_u2d(0x3ff8ace5422aa0dbull)) + (m >= cg_u2d(0x3ffd5818dcfba487ull));
    return 4 * e + j;
}

// One thread per (slab, quantized token): n = sum over heads of the head vector's L2 norm (double, heads
// and dims in order); code[i] = quarter_octave(n), or CG_NO_NORM where n = 0. bad = 1 on a non-finite value.
CG_KERNEL void cg_token_norms(const u8 *src, int dtype, i64 slabs, i64 tokens, i64 channels, i64 exact, i64 heads,
                              i64 *code, int *bad) {
    i64 tq = tokens - exact, dim = channels / heads;
    CG_FOR(i, slabs * tq) {
        i64 s = i / tq, t = i % tq;
        u64 row = (u64)((s * tokens + exact + t) * channels);
        double n = 0.0;
        int ok = 1;
        for (i64 h = 0; h < heads && ok; h++) {
            double q = 0.0;
            for (i64 d = 0; d < dim; d++) {
                float x = load_value(src, dtype, row + (u64)(h * dim + d));
                if (!finite_f32(x)) { ok = 0; break; }
                double xd = (double)x;
                q = cg_dadd(q, cg_dmul(xd, xd));
            }
            n = cg_dadd(n, cg_dsqrt(q));
        }
        if (!ok || !(n < cg_u2d(0x7FF0000000000000ull))) { bad[0] = 1; code[i] = CG_NO_NORM; continue; }
        code[i] = n > 0.0 ? quarter_octave(n) : CG_NO_NORM;
    }
}

// One thread per slab: the centre (the rounded mean of the slab's codes, CG_NO_NORM left out), then each
// token's step code clamp(code - centre, -8, 8) (0 for CG_NO_NORM) into tcodes [slabs][tokens_q].
CG_KERNEL void cg_token_codes(const i64 *code, i64 slabs, i64 tq, signed char *tcodes) {
    CG_FOR(s, slabs) {
        i64 sum = 0, cnt = 0;
        for (i64 t = 0; t < tq; t++)
            if (code[s * tq + t] != CG_NO_NORM) { sum += code[s * tq + t]; cnt++; }
        i64 centre = 0;
        if (cnt) {
            i64 a = 2 * sum + cnt, b = 2 * cnt, q = a / b;
            centre = (a % b != 0 && a < 0) ? q - 1 : q;  // floor
        }
        for (i64 t = 0; t < tq; t++) {
            i64 c = code[s * tq + t], k = c == CG_NO_NORM ? 0 : c - centre;
            tcodes[s * tq + t] = (signed char)(k < -CG_TCODE_MAX ? -CG_TCODE_MAX : (k > CG_TCODE_MAX ? CG_TCODE_MAX : k));
        }
    }
}

// One thread per (slab, channel), with token codes: the largest |x - mean| / mult(code of x's token), the
// deviation the channel's step must cover in 127 steps (mean: the bfloat16 one cg_params writes).
CG_KERNEL void cg_tdev(const u8 *src, int dtype, i64 slabs, i64 tokens, i64 channels, i64 exact, const double *sum,
                       const signed char *tcodes, float *dev) {
    i64 n = tokens - exact;
    CG_FOR(ch, slabs * channels) {
        i64 s = ch / channels, c = ch % channels;
        float muf = n ? bf16_to_f32(f32_to_bf16(cg_d2f(cg_ddiv(sum[ch], (double)n)))) : 0.0f, best = 0.0f;
        for (i64 t = exact; t < tokens; t++) {
            float x = load_value(src, dtype, (u64)((s * tokens + t) * channels + c));
            float a = cg_fdiv(fabsf(cg_fsub(x, muf)), tmult(tcodes[s * n + t - exact]));
            if (!(a <= best)) best = a;
        }
        dev[ch] = best;
    }
}

// One thread per slab: the slab's sigma, then each channel's bfloat16 mean and (rounded up) step; the
// step targets are sigma * a[ch] + b[ch] (targets = a[nch] then b[nch]). With have_tdev, a channel's
// deviation is tdev[ch] (cg_tdev) and its step must stay below 2^126.
CG_KERNEL void cg_params(const double *sum, const double *sumsq, const float *mn, const float *mx,
                         const double *targets, i64 slabs, i64 tokens, i64 channels, i64 exact, u16 *qparams,
                         int *bad, const float *tdev, int have_tdev) {
    i64 nch = slabs * channels, n = tokens - exact;
    CG_FOR(s, slabs) {
        const i64 c0 = s * channels;
        if (n == 0) {
            for (i64 c = 0; c < channels; c++) { qparams[c0 + c] = 0; qparams[nch + c0 + c] = 0x3F80; }
            continue;
        }
        double varsum = 0.0;
        for (i64 c = 0; c < channels; c++) {
            double mean = cg_ddiv(sum[c0 + c], (double)n), msq = cg_dmul(mean, mean);
            double var = cg_dsub(cg_ddiv(sumsq[c0 + c], (double)n), msq);
            varsum = cg_dadd(varsum, var > 0.0 ? var : 0.0);
        }
        double sigma = cg_dsqrt(cg_ddiv(varsum, (double)channels));
        for (i64 c = 0; c < channels; c++) {
            u16 mu = f32_to_bf16(cg_d2f(cg_ddiv(sum[c0 + c], (double)n)));
            float muf = bf16_to_f32(mu);
            float up = cg_fsub(mx[c0 + c], muf), down = cg_fsub(muf, mn[c0 + c]);
            float dev = have_tdev ? tdev[c0 + c] : (up > down ? up : down);
            if (!finite_f32(dev)) { bad[0] = 2; break; }
            double step = cg_ddiv((double)dev, 127.0);
            double target = cg_dadd(cg_dmul(sigma, targets[c0 + c]), targets[nch + c0 + c]);
            if (target > step) step = target;
            float stepf = cg_d2f(step);
            if (stepf < cg_u2f(0x00800000u)) stepf = cg_u2f(0x00800000u);
            u16 sb = f32_to_bf16_up(stepf);
            if ((sb & 0x7F80) == 0x7F80 || (have_tdev && (sb & 0x7F80) > CG_TSTEP_MAX_EXP)) { bad[0] = 2; break; }
            qparams[c0 + c] = mu;
            qparams[nch + c0 + c] = sb;
        }
    }
}

// One thread per quantized value: symbol = 127 + sign(u) * min(floor(|u| + rnd), 127),
// u = (x - mean) / step, rnd = rnd256 / 256 (128: nearest; smaller: a deadzone around zero); with
// have_ts, step = the channel's step * mult(tcodes[slab][token]) (exact).
CG_KERNEL void cg_quantize(const u8 *src, int dtype, i64 slabs, i64 tokens, i64 channels, i64 exact,
                           const u16 *qparams, int rnd256, u8 *sym, const signed char *tcodes, int have_ts) {
    i64 tq = tokens - exact, nch = slabs * channels;
    float rnd = (float)rnd256 / 256.0f;  // exact
    CG_FOR(i, slabs * tq * channels) {
        i64 c = i % channels, t = (i / channels) % tq, s = i / (channels * tq), ch = s * channels + c;
        float x = load_value(src, dtype, (u64)((s * tokens + exact + t) * channels + c));
        float step = bf16_to_f32(qparams[nch + ch]);
        if (have_ts) step = cg_fmul(step, tmult(tcodes[s * tq + t]));
        float u = cg_fdiv(cg_fsub(x, bf16_to_f32(qparams[ch])), step);
        float m = floorf(cg_fadd(fabsf(u), rnd));
        if (m > (float)CG_QMAX) m = (float)CG_QMAX;
        int q = (int)m;
        sym[i] = (u8)(u < 0.0f ? CG_QMAX - q : CG_QMAX + q);
    }
}

// ------------------------------------------------------------------ tables

// One thread per (slab, channel): histogram, then the inline table (or 0 = the profile's table).
// Frequencies go to scratch[ch * 255 ...], their count to fcount[ch] (0 unless n >= 2).
CG_KERNEL void cg_tables(const u8 *sym, i64 slabs, i64 tq, i64 channels, int have_profile, const u8 *plo,
                         const u8 *pn, u8 *lo, u8 *n, u16 *scratch, u32 *fcount) {
    CG_FOR(ch, slabs * channels) {
        i64 s = ch / channels, c = ch % channels;
        u32 counts[CG_NSYM];
        for (int i = 0; i < CG_NSYM; i++) counts[i] = 0;
        for (i64 t = 0; t < tq; t++) counts[sym[(s * tq + t) * channels + c]]++;
        int first = -1, last = -1;
        for (int i = 0; i < CG_NSYM; i++)
            if (counts[i]) { if (first < 0) first = i; last = i; }
        fcount[ch] = 0;
        if (first < 0) { lo[ch] = CG_QMAX; n[ch] = 1; continue; }
        if (have_profile && pn[ch] > 0 && first >= plo[ch] && last < plo[ch] + pn[ch]) {
            lo[ch] = 0; n[ch] = 0; continue;
        }
        int width = last - first + 1;
        lo[ch] = (u8)first;
        n[ch] = (u8)width;
        if (width < 2) continue;
        u64 total = 0;
        int top = 0;
        for (int i = 0; i < width; i++) {
            total += counts[first + i];
            if (counts[first + i] > counts[first + top]) top = i;
        }
        i64 acc = 0;
        u16 *f = scratch + ch * CG_NSYM;
        for (int i = 0; i < width; i++) {
            u32 cnt = counts[first + i], v = (u32)(((u64)cnt * CG_M) / total);
            u32 fr = cnt == 0 ? 0 : (v == 0 ? 1 : v);
            f[i] = (u16)fr;  // the top entry is corrected below (it may be 65536 before that)
            counts[first + i] = fr;
            acc += fr;
        }
        f[top] = (u16)((i64)counts[first + top] + (i64)CG_M - acc);
        fcount[ch] = (u32)width;
    }
}

// One thread per channel: copy its fcount[ch] frequencies to out[start[ch] ...].
CG_KERNEL void cg_compact_freq(const u16 *scratch, const u32 *fcount, const u64 *start, i64 nch, u16 *out) {
    CG_FOR(ch, nch) {
        for (u32 i = 0; i < fcount[ch]; i++) out[start[ch] + i] = scratch[ch * CG_NSYM + i];
    }
}

// One thread per channel: the table in force (inline, or the profile's when n == 0) as cumulative
// frequencies cum[ch * 256 + 0 .. n] and the decoder's index bucket[ch * 256 + v >> 8].
CG_KERNEL void cg_build_cum(const u8 *lo, const u8 *n, const u16 *freq, const u64 *foff, int have_profile,
                            const u8 *plo, const u8 *pn, const u16 *pfreq, const u64 *pfoff, i64 nch, u32 *cum,
                            u8 *bucket, u8 *elo, u8 *en) {
    CG_FOR(ch, nch) {
        int use_profile = n[ch] == 0 && have_profile;
        int tl = use_profile ? plo[ch] : lo[ch], tn = use_profile ? pn[ch] : n[ch];
        const u16 *f = use_profile ? pfreq + pfoff[ch] : freq + foff[ch];
        u32 *cu = cum + ch * 256;
        cu[0] = 0;
        if (tn <= 1) cu[1] = CG_M;
        else for (int i = 0; i < tn; i++) cu[i + 1] = cu[i] + f[i];
        int k = 0;
        for (u32 b = 0; b < 256; b++) {
            while (cu[k + 1] <= (b << 8)) k++;
            bucket[ch * 256 + b] = (u8)k;
        }
        elo[ch] = (u8)tl;
        en[ch] = (u8)(tn < 1 ? 1 : tn);
    }
}

// ------------------------------------------------------------------ range coder

struct cg_enc {
    u64 low;
    u32 range;
    u8 cache;
    u64 cache_size;
    u8 *out;
    u32 pos;
    int first;
};

CG_DEV void enc_put(cg_enc *e, u8 b) {
    if (e->first) { e->first = 0; return; }
    e->out[e->pos++] = b;
}

CG_DEV void enc_shift_low(cg_enc *e) {
    if ((u32)e->low < 0xFF000000u || (e->low >> 32) != 0) {
        u8 carry = (u8)(e->low >> 32), temp = e->cache;
        do {
            enc_put(e, (u8)(temp + carry));
            temp = 0xFF;
        } while (--e->cache_size != 0);
        e->cache = (u8)(e->low >> 24);
    }
    e->cache_size++;
    e->low = (e->low & 0x00FFFFFFu) << 8;
}

CG_DEV void enc_symbol(cg_enc *e, u32 c0, u32 c1) {
    u32 r = e->range >> 16;
    e->low += (u64)r * c0;
    e->range = c1 == CG_M ? e->range - r * c0 : r * (c1 - c0);
    while (e->range < CG_TOP) {
        e->range <<= 8;
        enc_shift_low(e);
    }
}

// One thread per stream (group channels of one slab, token by token): bytes at scratch[base[j]...],
// their count in len[j]; a symbol outside its table sets bad.
CG_KERNEL void cg_encode(const u8 *sym, i64 slabs, i64 tq, i64 channels, i64 group, const u32 *cum, const u8 *elo,
                         const u8 *en, u8 *scratch, const u64 *base, u32 *len, int *bad) {
    i64 gps = (channels + group - 1) / group;
    CG_FOR(j, slabs * gps) {
        i64 s = j / gps, c0 = (j % gps) * group, w = c0 + group <= channels ? group : channels - c0;
        cg_enc e = {0, 0xFFFFFFFFu, 0, 1, scratch + base[j], 0, 1};
        int ok = 1;
        for (i64 t = 0; t < tq && ok; t++) {
            for (i64 k = 0; k < w; k++) {
                i64 ch = s * channels + c0 + k;
                u32 i = (u32)sym[(s * tq + t) * channels + c0 + k] - elo[ch];
                const u32 *cu = cum + ch * 256;
                if (i >= en[ch] || cu[i + 1] == cu[i]) { ok = 0; break; }
                enc_symbol(&e, cu[i], cu[i + 1]);
            }
        }
        if (!ok) bad[0] = 3;
        for (int i = 0; i < 5; i++) enc_shift_low(&e);
        len[j] = e.pos;
    }
}

// One thread per stream: move stream j from scratch[base[j]...] to out[start[j]...].
CG_KERNEL void cg_gather(const u8 *scratch, const u64 *base, const u32 *len, const u64 *start, i64 nstreams,
                         u8 *out) {
    CG_FOR(j, nstreams) {
        for (u32 i = 0; i < len[j]; i++) out[start[j] + i] = scratch[base[j] + i];
    }
}

// One thread per stream: decode stream j (data[ends[j-1] .. ends[j])) into dequantized values of
// out (want_symbols == 0) or symbols of sym_out; bad[j] = 1 when the stream is inconsistent. With
// have_ts, a value's step is its channel's times mult(tcodes[slab][token]) (exact).
CG_KERNEL void cg_decode(const u8 *data, const u32 *ends, i64 slabs, i64 tokens, i64 channels, i64 exact, i64 group,
                         const u32 *cum, const u8 *bucket, const u8 *elo, const u16 *qparams, int dtype, u8 *out,
                         int want_symbols, u8 *sym_out, int *bad, const signed char *tcodes, int have_ts) {
    i64 gps = (channels + group - 1) / group, tq = tokens - exact, nch = slabs * channels;
    CG_FOR(j, slabs * gps) {
        i64 s = j / gps, c0 = (j % gps) * group, w = c0 + group <= channels ? group : channels - c0;
        u32 start = j == 0 ? 0 : ends[j - 1], len = ends[j] - start, pos = 0, flag = 0;
        const u8 *p = data + start;
        u32 range = 0xFFFFFFFFu, code = 0;
        for (int i = 0; i < 4; i++) { code = (code << 8) | (pos < len ? p[pos] : 0); pos++; }
        for (i64 t = 0; t < tq; t++) {
            float mult = have_ts ? tmult(tcodes[s * tq + t]) : 1.0f;
            for (i64 k = 0; k < w; k++) {
                i64 ch = s * channels + c0 + k;
                const u32 *cu = cum + ch * 256;
                u32 r = range >> 16, v = code / r;
                if (v > 0xFFFFu) v = 0xFFFFu;
                u32 i = bucket[ch * 256 + (v >> 8)];
                while (cu[i + 1] <= v) i++;
                u32 lo = cu[i], hi = cu[i + 1];
                code -= r * lo;
                range = hi == CG_M ? range - r * lo : r * (hi - lo);
                flag |= code >= range;
                while (range < CG_TOP) {
                    range <<= 8;
                    code = (code << 8) | (pos < len ? p[pos] : 0);
                    pos++;
                }
                u8 symbol = (u8)(elo[ch] + i);
                if (want_symbols) {
                    sym_out[(s * tq + t) * channels + c0 + k] = symbol;
                } else {
                    float q = (float)((int)symbol - CG_QMAX);
                    float step = cg_fmul(bf16_to_f32(qparams[nch + ch]), mult);  // exact (1.0 without codes)
                    float y = cg_fadd(bf16_to_f32(qparams[ch]), cg_fmul(q, step));
                    store_value(out, dtype, (u64)((s * tokens + exact + t) * channels + c0 + k), y);
                }
            }
        }
        bad[j] = (flag || pos != len) ? 1 : 0;
    }
}

// ------------------------------------------------------------------ RoPE (un)rotation of keys

// One thread per (slab, token, head, pair): rotate (rotate = 1) or un-rotate (0) the pair
// (d, d + D/2) of a K slab (even slabs when kv_factor is 2) by the table's (cos, sin)
// ([tokens][D/2][2]); other slabs are copied. Tokens before `exact` are left alone.
CG_KERNEL void cg_rope(const u8 *src, int sdt, u8 *dst, int ddt, i64 slabs, i64 tokens, i64 exact, i64 heads,
                       i64 dim, int kv_factor, const float *cs, int rotate) {
    i64 half = dim / 2, tq = tokens - exact;
    CG_FOR(i, slabs * tq * heads * half) {
        i64 d = i % half, h = (i / half) % heads, t = exact + (i / (half * heads)) % tq, s = i / (half * heads * tq);
        u64 b = (u64)((s * tokens + t) * heads * dim + h * dim);
        float x1 = load_value(src, sdt, b + d), x2 = load_value(src, sdt, b + half + d);
        if (kv_factor == 2 && s % 2 == 0) {
            float c = cs[(t * half + d) * 2], sn = cs[(t * half + d) * 2 + 1];
            float p1 = cg_fmul(x1, c), p2 = cg_fmul(x2, sn), p3 = cg_fmul(x2, c), p4 = cg_fmul(x1, sn);
            store_value(dst, ddt, b + d, rotate ? cg_fsub(p1, p2) : cg_fadd(p1, p2));
            store_value(dst, ddt, b + half + d, rotate ? cg_fadd(p3, p4) : cg_fsub(p3, p4));
        } else {
            store_value(dst, ddt, b + d, x1);
            store_value(dst, ddt, b + half + d, x2);
        }
    }
}

// One thread per output value (slab, token, head, d): dst = M[s][h] @ src over the head's D values,
// for tokens exact.. (float32; matrices [slabs][heads][D][D], row d = output d). With has_live, a
// channel whose live byte is 0 holds one value (that of token `exact`): those terms are summed
// first, in channel order from +0, and the live ones are added after, in channel order; without,
// acc = +0 then every channel in order. Exactly the C coder's transform, bit for bit.
CG_KERNEL void cg_transform(const float *src, float *dst, i64 slabs, i64 tokens, i64 exact, i64 heads, i64 dim,
                            const float *mats, const u8 *live, int has_live) {
    i64 tq = tokens - exact, C = heads * dim;
    CG_FOR(i, slabs * tq * heads * dim) {
        i64 d = i % dim, h = (i / dim) % heads, t = exact + (i / (dim * heads)) % tq, s = i / (dim * heads * tq);
        const float *m = mats + ((u64)(s * heads + h) * (u64)dim + (u64)d) * (u64)dim;
        const float *x = src + (u64)((s * tokens + t) * C + h * dim);
        const float *x0 = src + (u64)((s * tokens + exact) * C + h * dim);
        const u8 *lv = live + (u64)(s * C + h * dim);
        float acc = 0.0f;
        if (has_live)
            for (i64 e = 0; e < dim; e++)
                if (!lv[e]) acc = cg_fadd(acc, cg_fmul(m[e], x0[e]));
        for (i64 e = 0; e < dim; e++)
            if (!has_live || lv[e]) acc = cg_fadd(acc, cg_fmul(m[e], x[e]));
        dst[(u64)((s * tokens + t) * C + h * dim + d)] = acc;
    }
}
