// CacheBlend kernels: RoPE re-rotation of cached keys, per-token KV deviation, and the gather /
// scatter of the selected tokens' K/V, all on float32 tensors.
//
// Loaded by kvstore/blend/gpu.py with cupy.RawModule (NVRTC); compiles standalone with
// `nvcc -std=c++17 -arch=sm_90 -c` and needs no header. Defining BL_EMULATE compiles the same file
// as plain C++ whose kernels run their whole grid-stride loop on the CPU (tests/blend/test_kernels.py
// checks them against the torch path that way). Every argument is a 64-bit integer (addresses
// included) so that one launcher serves every kernel.

typedef long long i64;

#ifdef BL_EMULATE
#include <math.h>
#define BL_KERNEL extern "C"
static inline i64 bl_first() { return 0; }
static inline i64 bl_stride() { return 1; }
#else
#define BL_KERNEL extern "C" __global__
__device__ __forceinline__ i64 bl_first() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 bl_stride() { return (i64)gridDim.x * blockDim.x; }
#endif

#define BL_FOR(i, n) for (i64 i = bl_first(); i < (i64)(n); i += bl_stride())

// Rotate keys [rows, tokens, heads, head_dim] in place by delta[token] * inv_freq[pair].
// One work item per (row, token, head, pair); `gptj` != 0 pairs dims (2p, 2p+1), else (p, p + rot/2).
// Angles are formed in double precision, as the CPU path does.
BL_KERNEL void rope_shift(i64 keys_addr, i64 delta_addr, i64 freq_addr, i64 rows, i64 tokens, i64 heads,
                          i64 head_dim, i64 rotary_dim, i64 gptj) {
    float *keys = (float *)keys_addr;
    const i64 *delta = (const i64 *)delta_addr;
    const float *inv_freq = (const float *)freq_addr;
    i64 pairs = rotary_dim / 2;
    BL_FOR(i, rows * tokens * heads * pairs) {
        i64 p = i % pairs;
        i64 vec = i / pairs;                 // (row, token, head)
        i64 token = (vec / heads) % tokens;
        double angle = (double)delta[token] * (double)inv_freq[p];
        float c = (float)cos(angle), s = (float)sin(angle);
        float *x = keys + vec * head_dim;
        i64 ia = gptj ? 2 * p : p;
        i64 ib = gptj ? 2 * p + 1 : p + pairs;
        float a = x[ia], b = x[ib];
        x[ia] = a * c - b * s;
        x[ib] = b * c + a * s;
    }
}

// out[t] = sum over heads and dims of (fk - ok)^2 + (fv - ov)^2; inputs [heads, n, d].
BL_KERNEL void kv_deviation(i64 fk_addr, i64 fv_addr, i64 ok_addr, i64 ov_addr, i64 out_addr, i64 heads,
                            i64 n, i64 d) {
    const float *fk = (const float *)fk_addr, *fv = (const float *)fv_addr;
    const float *ok = (const float *)ok_addr, *ov = (const float *)ov_addr;
    float *out = (float *)out_addr;
    BL_FOR(t, n) {
        float acc = 0.0f;
        for (i64 h = 0; h < heads; ++h) {
            i64 base = (h * n + t) * d;
            for (i64 j = 0; j < d; ++j) {
                float dk = fk[base + j] - ok[base + j];
                float dv = fv[base + j] - ov[base + j];
                acc += dk * dk + dv * dv;
            }
        }
        out[t] = acc;
    }
}

// dst[h, k, :] = src[h, idx[k], :]: src [heads, total, d], dst [heads, n, d].
BL_KERNEL void gather_tokens(i64 src_addr, i64 dst_addr, i64 idx_addr, i64 heads, i64 total, i64 n, i64 d) {
    const float *src = (const float *)src_addr;
    float *dst = (float *)dst_addr;
    const i64 *idx = (const i64 *)idx_addr;
    BL_FOR(i, heads * n * d) {
        i64 j = i % d, k = (i / d) % n, h = i / (d * n);
        dst[i] = src[(h * total + idx[k]) * d + j];
    }
}

// dst[h, idx[k], :] = src[h, k, :]: src [heads, n, d], dst [heads, total, d]; idx must not repeat.
BL_KERNEL void scatter_tokens(i64 src_addr, i64 dst_addr, i64 idx_addr, i64 heads, i64 total, i64 n, i64 d) {
    const float *src = (const float *)src_addr;
    float *dst = (float *)dst_addr;
    const i64 *idx = (const i64 *)idx_addr;
    BL_FOR(i, heads * n * d) {
        i64 j = i % d, k = (i / d) % n, h = i / (d * n);
        dst[(h * total + idx[k]) * d + j] = src[i];
    }
}
