// FlashAttention-2 tiling for CPU, called from JAX through the XLA FFI (see cpu_flash.py).
//
// Forward (Dao 2023, Alg. 1): per query tile, an online softmax over 64-key tiles,
//     m' = max(m, rowmax S),  ℓ' = e^(m−m')·ℓ + rowsum e^(S−m'),  O' = e^(m−m')·O + e^(S−m')·V,
// ending with O/ℓ and the row log-sum-exp L = m + log ℓ kept for the backward pass.
// Backward (Alg. 2): per key tile, P = e^(S−L) recomputed, then
//     dV += Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − δ),  dQ += dS·K·scale,  dK += dSᵀ·Q·scale,
// with δ = rowsum(dO ⊙ O).
//
// Which keys a query sees is a [B, T, S] bool array, read once per call into a map of its tiles:
// tiles with no visible pair are skipped, so causal and windowed masks cost only the tiles they
// touch, and wholly visible tiles read no mask at all. A query that sees no key gets
// uniform weights over all S keys, as the `xla` backend gives it (every logit equal).
// Layouts are the model's own: q, o [B, T, H, D]; k, v [B, S, K, D] (H a multiple of K: query
// head h reads key/value head h / (H/K)); lse [B, H, T]. float32; D a multiple of 16.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 64;   // query rows and key columns per tile
constexpr int kRows = 4;    // output rows per micro-kernel call

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint8_t b16u __attribute__((vector_size(16), aligned(1), may_alias));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline i16 visible16(const uint8_t* p) {   // 16 mask bytes → lanes of −1 (visible) / 0
  return __builtin_convertvector(*reinterpret_cast<const b16u*>(p), i16) != 0;
}

// e^x: 2^n · e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2, e^r by its degree-7 Taylor polynomial
// (relative error < 3e-9); 0 below −87 (so e^(−∞) = 0).
inline v16 exp16(v16 x) {
  const v16 lo = splat(-87.0f), hi = splat(88.0f);
  v16 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v16 shifter = splat(12582912.0f);   // 1.5·2^23: adding it rounds to an integer
  v16 n = (xc * splat(1.44269504f) + shifter) - shifter;
  v16 r = xc - n * splat(0.693145751953125f) - n * splat(1.42860682e-6f);
  v16 p = splat(1.0f / 5040);
  p = p * r + splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  v16 y = p * two_n;
  return x < lo ? v16{} : y;
}

// Lanes of x in the order of the 16 indices (GCC's builtin since 4.7; clang's has another name).
#if defined(__clang__)
#define PERMUTE16(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define PERMUTE16(x, ...) __builtin_shuffle(x, i16{__VA_ARGS__})
#endif

// Horizontal sum and max of 16 lanes by halving: 4 shuffles instead of 15 scalar steps.
inline v16 swap_halves(v16 x, int width) {
  switch (width) {
    case 8: return PERMUTE16(x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return PERMUTE16(x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    case 2: return PERMUTE16(x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    default: return PERMUTE16(x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
}

inline float sum16(v16 x) {
  for (int width = 8; width >= 1; width /= 2) x += swap_halves(x, width);
  return x[0];
}

inline float max16(v16 x) {
  for (int width = 8; width >= 1; width /= 2) {
    const v16 y = swap_halves(x, width);
    x = x > y ? x : y;
  }
  return x[0];
}

// C[r, 0:16·NV] (+)= Σ_k A[r·ar + k·ak] · B[k·ldb + 0:16·NV] for the kRows rows r (A row-major:
// ar = lda, ak = 1; A transposed: ar = 1, ak = lda); C is overwritten unless Accumulate.
template <int NV, bool Accumulate>
inline void micro(const float* a, int ar, int ak, const float* b, int ldb, int depth, float* c,
                  int ldc) {
  v16 acc[kRows][NV];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[r][n] = Accumulate ? load(c + r * ldc + 16 * n) : v16{};
  for (int k = 0; k < depth; ++k) {
    v16 row[NV];
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) {
      row[n] = load(b + k * ldb + 16 * n);
      // Keep the row in a register, so one load feeds kRows FMAs: folded into each FMA as a memory
      // operand (GCC's choice on x86 without this) it is loaded kRows times, and on CPUs with one
      // 512-bit load per cycle the loads, not the FMAs, set the pace.
#if defined(__x86_64__)
      asm("" : "+v"(row[n]));
#endif
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const v16 x = splat(a[r * ar + k * ak]);
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) acc[r][n] += x * row[n];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) store(c + r * ldc + 16 * n, acc[r][n]);
}

// C[m×n] (+)= op(A)·B, row-major with leading dimensions, op(A) = A [m×depth] or, with
// ``transposed``, Aᵀ for A [depth×m]; m % kRows == 0, n % 16 == 0; C += unless Accumulate is false.
template <bool Accumulate = true>
void gemm(int m, int n, int depth, const float* a, int lda, bool transposed, const float* b,
          int ldb, float* c, int ldc) {
  const int ar = transposed ? 1 : lda, ak = transposed ? lda : 1;
  for (int col = 0; col < n; col += 64) {
    const int vectors = std::min(4, (n - col) / 16);
    for (int r = 0; r < m; r += kRows) {
      const float* a_r = a + r * ar;
      float* c_r = c + r * ldc + col;
      switch (vectors) {
        case 4: micro<4, Accumulate>(a_r, ar, ak, b + col, ldb, depth, c_r, ldc); break;
        case 3: micro<3, Accumulate>(a_r, ar, ak, b + col, ldb, depth, c_r, ldc); break;
        case 2: micro<2, Accumulate>(a_r, ar, ak, b + col, ldb, depth, c_r, ldc); break;
        default: micro<1, Accumulate>(a_r, ar, ak, b + col, ldb, depth, c_r, ldc); break;
      }
    }
  }
}

// The cores the calling thread may run on (a worker pinned to one core gets one).
int64_t usable_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// `count` elements of a thread's scratch memory (below).
template <typename T>
struct Span {
  T* ptr;
  int64_t count;
  T* data() const { return ptr; }
  T* begin() const { return ptr; }
  T* end() const { return ptr + count; }
  T& operator[](int64_t i) const { return ptr[i]; }
};

// Working memory of the calling thread, kept from call to call (XLA's pool threads live as long as
// the process), so a warm call allocates nothing: with lcr.host_memory's single malloc arena, the
// buffers each item used to allocate contended for the arena's lock with XLA's own threads. Declare
// every buffer's size up front, then take() them in that order; contents start undefined.
class Scratch {
 public:
  explicit Scratch(std::initializer_list<int64_t> sizes_in_bytes) {
    int64_t vectors = 0;
    for (int64_t bytes : sizes_in_bytes) vectors += vectors_for(bytes);
    std::vector<v16>& memory = thread_memory();
    if (static_cast<int64_t>(memory.size()) < vectors) memory.resize(vectors);
    next_ = memory.data();
    end_ = next_ + vectors;
  }
  template <typename T>
  Span<T> take(int64_t count) {
    T* ptr = reinterpret_cast<T*>(next_);
    next_ += vectors_for(count * static_cast<int64_t>(sizeof(T)));
    if (next_ > end_) std::abort();   // a take() the constructor was not told of
    return Span<T>{ptr, count};
  }

 private:
  static int64_t vectors_for(int64_t bytes) { return (bytes + sizeof(v16) - 1) / sizeof(v16); }
  static std::vector<v16>& thread_memory() {
    thread_local std::vector<v16> memory;
    return memory;
  }
  v16 *next_, *end_;
};

// Items of one parallel_for, shared with the helper tasks (which may start after it returns).
struct Work {
  explicit Work(int64_t count, std::function<void(int64_t)> body)
      : count(count), body(std::move(body)) {}
  const int64_t count;
  const std::function<void(int64_t)> body;   // called only for claimed items, before the wait ends
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mutex;
  std::condition_variable finished;

  void run() {   // claim items until none is left
    int64_t ran = 0;
    for (int64_t item; (item = next.fetch_add(1)) < count; ++ran) body(item);
    if (ran && done.fetch_add(ran) + ran == count) {
      std::lock_guard<std::mutex> lock(mutex);
      finished.notify_all();
    }
  }
};

// Runs body(item) for item in [0, count) on the calling thread and on XLA's intra-op thread pool
// (the threads that run the rest of the step), so the kernel never adds threads of its own that
// would compete for the cores with XLA's: a helper that starts late finds nothing left to do, and
// the caller waits only for items already claimed.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t count, const Body& body) {
  const int64_t helpers =
      std::min<int64_t>({count, usable_cores(), std::max<int64_t>(1, pool.num_threads())}) - 1;
  auto work = std::make_shared<Work>(count, [&body](int64_t item) { body(item); });
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->finished.wait(lock, [&] { return work->done.load() == count; });
}

struct Shape {
  int64_t batch, q_len, kv_len, heads, kv_heads, dim;
  int64_t groups() const { return heads / kv_heads; }
  int64_t q_tiles() const { return (q_len + kTile - 1) / kTile; }
  int64_t kv_tiles() const { return (kv_len + kTile - 1) / kTile; }
  // offsets of row t / key s of head h / kv head g
  int64_t q_at(int64_t b, int64_t t, int64_t h) const {
    return ((b * q_len + t) * heads + h) * dim;
  }
  int64_t kv_at(int64_t b, int64_t s, int64_t g) const {
    return ((b * kv_len + s) * kv_heads + g) * dim;
  }
};

// A [kTile × width] block starting at row `first` of a row-major matrix x with `count` rows and
// leading dimension ld: x itself when the block is whole, else a zero-padded copy in scratch.
const float* block(const float* x, int64_t ld, int64_t first, int64_t count, int64_t width,
                   float* scratch, int64_t* ld_out) {
  if (first + kTile <= count) {
    *ld_out = ld;
    return x + first * ld;
  }
  const int64_t rows = std::max<int64_t>(0, count - first);
  std::memset(scratch, 0, kTile * width * sizeof(float));
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(scratch + r * width, x + (first + r) * ld, width * sizeof(float));
  *ld_out = width;
  return scratch;
}

// Rows [first, first + kTile) of x (leading dimension ld, `count` rows, D wide) transposed into
// out [D × kTile], zero past count.
void pack_transposed(const float* x, int64_t ld, int64_t first, int64_t count, int64_t d,
                     float* out) {
  const int64_t rows = std::min<int64_t>(kTile, count - first);
  if (rows < kTile) std::memset(out, 0, d * kTile * sizeof(float));
  for (int64_t c = 0; c < rows; ++c) {
    const float* src = x + (first + c) * ld;
    for (int64_t e = 0; e < d; e += 16) {
      const v16 row = load(src + e);
      for (int i = 0; i < 16; ++i) out[(e + i) * kTile + c] = row[i];
    }
  }
}

// The [kTile × kTile] mask tile of queries t0… and keys s0… of one batch row: a view into it when
// whole, else a zero-padded copy in scratch.
const uint8_t* mask_block(const Shape& sh, const uint8_t* vis_b, int64_t t0, int64_t s0,
                          uint8_t* scratch, int64_t* ld) {
  if (t0 + kTile <= sh.q_len && s0 + kTile <= sh.kv_len) {
    *ld = sh.kv_len;
    return vis_b + t0 * sh.kv_len + s0;
  }
  const int64_t rows = std::min<int64_t>(kTile, sh.q_len - t0);
  const int64_t cols = std::min<int64_t>(kTile, sh.kv_len - s0);
  std::memset(scratch, 0, kTile * kTile);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(scratch + r * kTile, vis_b + (t0 + r) * sh.kv_len + s0, cols);
  *ld = kTile;
  return scratch;
}

// How much of a [kTile × kTile] tile of the mask is visible.
enum Seen : uint8_t { kNone, kSome, kAll };

// The Seen of every tile, [B, q_tiles, kv_tiles], read from the mask once per call: heads then skip
// hidden tiles without rescanning them and read no mask byte of a wholly visible tile. A tile that
// runs past T or S holds zero-padded rows or keys, so it is never kAll.
std::vector<uint8_t> tile_map(ffi::ThreadPool& pool, const Shape& sh, const uint8_t* visible) {
  const int64_t q_tiles = sh.q_tiles(), kv_tiles = sh.kv_tiles();
  std::vector<uint8_t> map(sh.batch * q_tiles * kv_tiles);
  parallel_for(pool, sh.batch * q_tiles, [&](int64_t item) {
    const int64_t b = item / q_tiles, t0 = item % q_tiles * kTile;
    const int64_t rows = std::min<int64_t>(kTile, sh.q_len - t0);
    for (int64_t j = 0; j < kv_tiles; ++j) {
      const int64_t s0 = j * kTile, cols = std::min<int64_t>(kTile, sh.kv_len - s0);
      bool any = false, all = rows == kTile && cols == kTile;
      for (int64_t r = 0; r < rows && (all || !any); ++r) {
        const uint8_t* row = visible + (b * sh.q_len + t0 + r) * sh.kv_len + s0;
        uint64_t either = 0, both = ~uint64_t{0};
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) {
          uint64_t bytes;
          std::memcpy(&bytes, row + c, 8);
          either |= bytes;
          both &= bytes;
        }
        for (; c < cols; ++c) either |= row[c];
        any |= either != 0;
        all &= both == 0x0101010101010101ull;   // every byte true (1)
      }
      map[item * kv_tiles + j] = any ? (all ? kAll : kSome) : kNone;
    }
  });
  return map;
}

// Output of a query that sees no key: the mean of all S values of kv head g.
void uniform_row(const Shape& sh, const float* v, int64_t b, int64_t g, float* out) {
  std::fill(out, out + sh.dim, 0.f);
  for (int64_t s = 0; s < sh.kv_len; ++s) {
    const float* src = v + sh.kv_at(b, s, g);
    for (int64_t e = 0; e < sh.dim; ++e) out[e] += src[e];
  }
  for (int64_t e = 0; e < sh.dim; ++e) out[e] /= static_cast<float>(sh.kv_len);
}

// One query head h of batch row b: every query tile against the key tiles it sees.
void forward_head(const Shape& sh, const float* q, const float* k, const float* v,
                  const uint8_t* visible, const uint8_t* tiles, float scale, float* o, float* lse,
                  int64_t item) {
  const int64_t d = sh.dim, nk = sh.kv_tiles(), b = item / sh.heads, h = item % sh.heads;
  const int64_t g = h / sh.groups(), q_ld = sh.heads * d, kv_ld = sh.kv_heads * d;
  const float *q_bh = q + sh.q_at(b, 0, h), *v_bg = v + sh.kv_at(b, 0, g);
  const uint8_t* vis_b = visible + b * sh.q_len * sh.kv_len;
  const uint8_t* tiles_b = tiles + b * sh.q_tiles() * nk;
  constexpr int64_t f = sizeof(float), tile = kTile * kTile;
  Scratch scratch({nk * d * kTile * f, kTile * d * f, kTile * d * f, kTile * d * f, tile * f,
                   kTile * f, kTile * f, tile});
  const Span<float> kt = scratch.take<float>(nk * d * kTile), q_pad = scratch.take<float>(kTile * d),
                    v_pad = scratch.take<float>(kTile * d), acc = scratch.take<float>(kTile * d),
                    s = scratch.take<float>(tile), m = scratch.take<float>(kTile),
                    l = scratch.take<float>(kTile);
  const Span<uint8_t> mask_pad = scratch.take<uint8_t>(tile);
  for (int64_t j = 0; j < nk; ++j)
    pack_transposed(k + sh.kv_at(b, 0, g), kv_ld, j * kTile, sh.kv_len, d,
                    kt.data() + j * d * kTile);
  for (int64_t t0 = 0; t0 < sh.q_len; t0 += kTile) {
    int64_t lq, lv, lm;
    const float* qb = block(q_bh, q_ld, t0, sh.q_len, d, q_pad.data(), &lq);
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(m.begin(), m.end(), -INFINITY);
    std::fill(l.begin(), l.end(), 0.f);
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t s0 = j * kTile;
      const uint8_t seen_tile = tiles_b[t0 / kTile * nk + j];
      if (seen_tile == kNone) continue;
      const bool all = seen_tile == kAll;
      const uint8_t* mask = all ? nullptr : mask_block(sh, vis_b, t0, s0, mask_pad.data(), &lm);
      gemm<false>(kTile, kTile, d, qb, lq, false, kt.data() + j * d * kTile, kTile, s.data(),
                  kTile);
      for (int64_t r = 0; r < kTile; ++r) {
        float* row = s.data() + r * kTile;
        v16 x[kTile / 16], most = splat(-INFINITY);
        for (int n = 0; n < kTile / 16; ++n) {
          x[n] = load(row + 16 * n) * scale;
          if (!all) x[n] = visible16(mask + r * lm + 16 * n) ? x[n] : splat(-INFINITY);
          most = most > x[n] ? most : x[n];
        }
        const float top = std::max(m[r], max16(most));
        if (top == -INFINITY) {   // nothing visible in this row yet
          std::fill(row, row + kTile, 0.f);
          continue;
        }
        const float correction = m[r] == -INFINITY ? 0.f : std::exp(m[r] - top);
        v16 total{};
        for (int n = 0; n < kTile / 16; ++n) {
          const v16 p = exp16(x[n] - top);
          store(row + 16 * n, p);
          total += p;
        }
        l[r] = l[r] * correction + sum16(total);
        m[r] = top;
        if (correction != 1.f)
          for (int64_t e = 0; e < d; ++e) acc[r * d + e] *= correction;
      }
      const float* vb = block(v_bg, kv_ld, s0, sh.kv_len, d, v_pad.data(), &lv);
      gemm(kTile, d, kTile, s.data(), kTile, false, vb, lv, acc.data(), d);
    }
    const int64_t rows = std::min<int64_t>(kTile, sh.q_len - t0);
    for (int64_t r = 0; r < rows; ++r) {
      float* out = o + sh.q_at(b, t0 + r, h);
      float* row_lse = lse + (b * sh.heads + h) * sh.q_len + t0 + r;
      if (l[r] > 0.f) {
        const float inv = 1.f / l[r];
        for (int64_t e = 0; e < d; ++e) out[e] = acc[r * d + e] * inv;
        *row_lse = m[r] + std::log(l[r]);
      } else {
        uniform_row(sh, v, b, g, out);
        *row_lse = -INFINITY;   // marks the uniform row for the backward pass
      }
    }
  }
}

// Gradients for kv head g of batch row b: dK, dV of its keys and dQ of its G query heads.
void backward_head(const Shape& sh, const float* q, const float* k, const float* v,
                   const uint8_t* visible, const uint8_t* tiles, const float* o, const float* lse,
                   const float* d_o, float scale, float* d_q, float* d_k, float* d_v,
                   int64_t item) {
  const int64_t d = sh.dim, groups = sh.groups(), padded = sh.q_tiles() * kTile;
  const int64_t b = item / sh.kv_heads, g = item % sh.kv_heads;
  const int64_t q_ld = sh.heads * d, kv_ld = sh.kv_heads * d;
  const float *k_bg = k + sh.kv_at(b, 0, g), *v_bg = v + sh.kv_at(b, 0, g);
  const uint8_t* vis_b = visible + b * sh.q_len * sh.kv_len;
  const uint8_t* tiles_b = tiles + b * sh.q_tiles() * sh.kv_tiles();
  constexpr int64_t f = sizeof(float), tile = kTile * kTile;
  const int64_t panel = kTile * d * f;
  Scratch scratch({groups * padded * f, groups * padded * d * f, panel, panel, panel, panel, panel,
                   panel, panel, tile * f, tile * f, tile});
  const Span<float> delta = scratch.take<float>(groups * padded),
                    dq = scratch.take<float>(groups * padded * d);
  const Span<float> k_pad = scratch.take<float>(kTile * d), q_pad = scratch.take<float>(kTile * d),
                    do_pad = scratch.take<float>(kTile * d), kcol = scratch.take<float>(d * kTile),
                    vcol = scratch.take<float>(d * kTile), dk = scratch.take<float>(kTile * d),
                    dv = scratch.take<float>(kTile * d), s = scratch.take<float>(tile),
                    dp = scratch.take<float>(tile);
  const Span<uint8_t> mask_pad = scratch.take<uint8_t>(tile);
  std::fill(delta.begin(), delta.end(), 0.f);
  std::fill(dq.begin(), dq.end(), 0.f);
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t h = g * groups + j;
    for (int64_t t = 0; t < sh.q_len; ++t) {
      const float *x = o + sh.q_at(b, t, h), *y = d_o + sh.q_at(b, t, h);
      v16 sum{};
      for (int64_t e = 0; e < d; e += 16) sum += load(x + e) * load(y + e);
      delta[j * padded + t] = sum16(sum);
    }
  }
  for (int64_t s0 = 0; s0 < sh.kv_len; s0 += kTile) {
    int64_t lk, lq, ldo, lm;
    const float* kb = block(k_bg, kv_ld, s0, sh.kv_len, d, k_pad.data(), &lk);
    pack_transposed(k_bg, kv_ld, s0, sh.kv_len, d, kcol.data());
    pack_transposed(v_bg, kv_ld, s0, sh.kv_len, d, vcol.data());
    std::fill(dk.begin(), dk.end(), 0.f);
    std::fill(dv.begin(), dv.end(), 0.f);
    for (int64_t j = 0; j < groups; ++j) {
      const int64_t h = g * groups + j;
      const float *q_bh = q + sh.q_at(b, 0, h), *do_bh = d_o + sh.q_at(b, 0, h);
      for (int64_t t0 = 0; t0 < sh.q_len; t0 += kTile) {
        const uint8_t seen_tile = tiles_b[t0 / kTile * sh.kv_tiles() + s0 / kTile];
        if (seen_tile == kNone) continue;
        const bool all = seen_tile == kAll;
        const uint8_t* mask = all ? nullptr : mask_block(sh, vis_b, t0, s0, mask_pad.data(), &lm);
        const int64_t rows = std::min<int64_t>(kTile, sh.q_len - t0);
        const float* row_lse = lse + (b * sh.heads + h) * sh.q_len + t0;
        const float* qb = block(q_bh, q_ld, t0, sh.q_len, d, q_pad.data(), &lq);
        const float* dob = block(do_bh, q_ld, t0, sh.q_len, d, do_pad.data(), &ldo);
        gemm<false>(kTile, kTile, d, qb, lq, false, kcol.data(), kTile, s.data(), kTile);   // S
        gemm<false>(kTile, kTile, d, dob, ldo, false, vcol.data(), kTile, dp.data(), kTile);  // dP
        for (int64_t r = 0; r < kTile; ++r) {
          float *prow = s.data() + r * kTile, *dprow = dp.data() + r * kTile;
          if (r >= rows || row_lse[r] == -INFINITY) {   // padding, or a uniform row (below)
            std::fill(prow, prow + kTile, 0.f);
            std::fill(dprow, dprow + kTile, 0.f);
            continue;
          }
          const float top = row_lse[r], dr = delta[j * padded + t0 + r];
          for (int n = 0; n < kTile / 16; ++n) {
            v16 p = exp16(load(prow + 16 * n) * scale - top);
            if (!all) p = visible16(mask + r * lm + 16 * n) ? p : v16{};
            store(prow + 16 * n, p);
            store(dprow + 16 * n, p * (load(dprow + 16 * n) - dr) * scale);   // dS·scale
          }
        }
        gemm(kTile, d, kTile, s.data(), kTile, true, dob, ldo, dv.data(), d);        // dV += Pᵀ·dO
        gemm(kTile, d, kTile, dp.data(), kTile, false, kb, lk,                         // dQ += dS·K
             dq.data() + (j * padded + t0) * d, d);
        gemm(kTile, d, kTile, dp.data(), kTile, true, qb, lq, dk.data(), d);          // dK += dSᵀ·Q
      }
    }
    const int64_t cols = std::min<int64_t>(kTile, sh.kv_len - s0);
    for (int64_t c = 0; c < cols; ++c) {
      std::memcpy(d_k + sh.kv_at(b, s0 + c, g), dk.data() + c * d, d * sizeof(float));
      std::memcpy(d_v + sh.kv_at(b, s0 + c, g), dv.data() + c * d, d * sizeof(float));
    }
  }
  for (int64_t j = 0; j < groups; ++j) {
    const int64_t h = g * groups + j;
    for (int64_t t = 0; t < sh.q_len; ++t) {
      std::memcpy(d_q + sh.q_at(b, t, h), dq.data() + (j * padded + t) * d, d * sizeof(float));
      if (lse[(b * sh.heads + h) * sh.q_len + t] != -INFINITY) continue;
      // Uniform row: P = 1/S everywhere, so dV += dO/S for every key; no gradient to q or k.
      const float* grad = d_o + sh.q_at(b, t, h);
      const float share = 1.f / static_cast<float>(sh.kv_len);
      for (int64_t s = 0; s < sh.kv_len; ++s) {
        float* dst = d_v + sh.kv_at(b, s, g);
        for (int64_t e = 0; e < d; ++e) dst[e] += grad[e] * share;
      }
    }
  }
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
}

ffi::Error check(const Shape& sh) {
  if (sh.dim % 16 != 0 || sh.heads % sh.kv_heads != 0 || sh.kv_len == 0)
    return ffi::Error::InvalidArgument("cpu_flash: head_dim must be a multiple of 16 and "
                                       "heads a multiple of kv_heads");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> visible, float scale, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse, ffi::ThreadPool pool) {
  const Shape sh = shape_of(q, k);
  if (ffi::Error e = check(sh); e.failure()) return e;
  const auto* mask = reinterpret_cast<const uint8_t*>(visible.typed_data());
  const std::vector<uint8_t> tiles = tile_map(pool, sh, mask);
  parallel_for(pool, sh.batch * sh.heads, [&](int64_t item) {
    forward_head(sh, q.typed_data(), k.typed_data(), v.typed_data(), mask, tiles.data(), scale,
                 o->typed_data(), lse->typed_data(), item);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> visible, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o, float scale,
                    ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                    ffi::ResultBuffer<ffi::F32> d_v, ffi::ThreadPool pool) {
  const Shape sh = shape_of(q, k);
  if (ffi::Error e = check(sh); e.failure()) return e;
  const auto* mask = reinterpret_cast<const uint8_t*>(visible.typed_data());
  const std::vector<uint8_t> tiles = tile_map(pool, sh, mask);
  parallel_for(pool, sh.batch * sh.kv_heads, [&](int64_t item) {
    backward_head(sh, q.typed_data(), k.typed_data(), v.typed_data(), mask, tiles.data(),
                  o.typed_data(), lse.typed_data(), d_o.typed_data(), scale, d_q->typed_data(),
                  d_k->typed_data(), d_v->typed_data(), item);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcrFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q [B, T, H, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k [B, S, K, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // v [B, S, K, D]
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // visible [B, T, S]
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // o [B, T, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse [B, H, T]
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcrFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k
                                  .Arg<ffi::Buffer<ffi::F32>>()    // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // visible
                                  .Arg<ffi::Buffer<ffi::F32>>()    // o
                                  .Arg<ffi::Buffer<ffi::F32>>()    // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dO
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dQ
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dK
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dV
                                  .Ctx<ffi::ThreadPool>());
