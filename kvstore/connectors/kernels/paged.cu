// Paged KV gather (pages -> chunk) and scatter (chunk -> pages) for every layout of
// kvstore/connectors/paged_layouts.py, one thread per word of 16, 8, 4, 2 or 1 bytes.
//
// Loaded by kvstore/connectors/paged_cuda.py with cupy.RawModule (NVRTC); compiles standalone with
// `nvcc -std=c++17 -arch=sm_90 -c` and needs no header. Defining PAGED_EMULATE compiles the same
// file as plain C++ whose kernels run their whole grid-stride loop on the CPU
// (tests/connectors/test_paged_kernels.py checks them against the torch path that way).
//
// The chunk is C-contiguous [layers, kv, tokens, rows_per_token, row_words] words: kvstore's
// [layers, 2, tokens, kv_heads, head_dim] (or MLA's [layers, tokens, latent_dim]) cut into rows,
// a row being head_dim values of one head, or all kv_heads * head_dim values of a token when a
// layout keeps a token's heads adjacent. Every layout is a set of word strides within one layer
// (kv, block, token-in-block, head), so one pair of kernels serves them all: vLLM FlashAttention
// NHD/HND, FlashInfer NHD/HND, MLA latent pages, SGLang layer_first / page_first /
// page_first_direct / page_head (whose per-layer base addresses lie inside one buffer).
// Every argument is a 64-bit integer (addresses included) except the word size.
//
// Work item i -> (layer, kv, token, row, word) in chunk order, so consecutive threads touch
// consecutive chunk words; the page side is contiguous within a row.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#ifdef PAGED_EMULATE
#include <string.h>
#define PG_DEV static inline
#define PG_KERNEL extern "C"
static inline i64 pg_first() { return 0; }
static inline i64 pg_stride() { return 1; }
#else
#define PG_DEV __device__ __forceinline__
#define PG_KERNEL extern "C" __global__
PG_DEV i64 pg_first() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
PG_DEV i64 pg_stride() { return (i64)gridDim.x * blockDim.x; }
#endif

#define PG_FOR(i, n) for (i64 i = pg_first(); i < (i64)(n); i += pg_stride())

// Copy one word of `bytes` bytes (16, 8, 4, 2 or 1; both addresses aligned to it).
PG_DEV void pg_copy(u8 *dst, const u8 *src, int bytes) {
#ifdef PAGED_EMULATE
    memcpy(dst, src, (size_t)bytes);
#else
    switch (bytes) {
    case 16: *(uint4 *)dst = *(const uint4 *)src; break;
    case 8: *(u64 *)dst = *(const u64 *)src; break;
    case 4: *(u32 *)dst = *(const u32 *)src; break;
    case 2: *(u16 *)dst = *(const u16 *)src; break;
    default: *dst = *src; break;
    }
#endif
}

// The page-side address of work item i (layer bases in `ptrs`, strides in words).
PG_DEV u8 *pg_page(i64 i, const i64 *ptrs, const i64 *slots, i64 kv, i64 tokens, i64 rows,
                   i64 row_words, i64 block_size, i64 s_kv, i64 s_block, i64 s_token, i64 s_head,
                   int word) {
    i64 w = i % row_words;
    i64 r = i / row_words;
    i64 h = r % rows;
    r /= rows;
    i64 t = r % tokens;
    r /= tokens;
    i64 k = r % kv;
    i64 layer = r / kv;
    i64 slot = slots[t];
    i64 block = slot / block_size;
    i64 offset = slot - block * block_size;
    i64 words = k * s_kv + block * s_block + offset * s_token + h * s_head + w;
    return (u8 *)(u64)ptrs[layer] + words * word;
}

// pages -> chunk
PG_KERNEL void paged_gather(u64 ptr_table, u64 slot_table, u64 chunk, i64 layers, i64 kv,
                            i64 tokens, i64 rows, i64 row_words, i64 block_size, i64 s_kv,
                            i64 s_block, i64 s_token, i64 s_head, int word) {
    const i64 *ptrs = (const i64 *)ptr_table;
    const i64 *slots = (const i64 *)slot_table;
    u8 *out = (u8 *)chunk;
    i64 n = layers * kv * tokens * rows * row_words;
    PG_FOR(i, n) {
        const u8 *src = pg_page(i, ptrs, slots, kv, tokens, rows, row_words, block_size, s_kv,
                                s_block, s_token, s_head, word);
        pg_copy(out + i * word, src, word);
    }
}

// chunk -> pages (slots must not repeat: the host checks before launching)
PG_KERNEL void paged_scatter(u64 ptr_table, u64 slot_table, u64 chunk, i64 layers, i64 kv,
                             i64 tokens, i64 rows, i64 row_words, i64 block_size, i64 s_kv,
                             i64 s_block, i64 s_token, i64 s_head, int word) {
    const i64 *ptrs = (const i64 *)ptr_table;
    const i64 *slots = (const i64 *)slot_table;
    const u8 *in = (const u8 *)chunk;
    i64 n = layers * kv * tokens * rows * row_words;
    PG_FOR(i, n) {
        u8 *dst = pg_page(i, ptrs, slots, kv, tokens, rows, row_words, block_size, s_kv, s_block,
                          s_token, s_head, word);
        pg_copy(dst, in + i * word, word);
    }
}
