// Native CPU kernels on a row-major f32 matrix X [n, d], as XLA FFI handlers (see
// __init__.py for why they exist and how they are built).
//
// Gram: K = (X − 1cᵀ)(X − 1cᵀ)ᵀ, the centre c given, or the weighted mean wᵀX of the
// rows, computed block by block while the block is in cache, or zero; the rows' squared
// norms ‖x_i‖² (uncentred) and, given a vector v, the projections ⟨x_i − c, v⟩ come with
// it. Each chunk's share of K is summed by register tiles of kR x kS dot products (vectors
// of kLanes floats, float32 within a cache-sized block of columns, float64 across blocks);
// only tiles on or above the diagonal are computed.
// RowSqDists: ‖x_i − c‖² and, given v, ⟨x_i − c, v⟩ for every row, one pass.
// Moments: μ = aᵀX and σ² = bᵀ(X − 1μᵀ)², coordinate-wise, for row weights a and b.
// MomentProducts: Moments, a direction u made from them coordinate-wise, and Gram's (or
// RowSqDists') products centred on μ and projected on u, each block of columns read once;
// its Gram matrix is of the rows with a_i ≠ 0 only.
// SortedSum, ClosestMean: each column's values sorted by a sorting network, then a
// weighted sum of the ranks, or the mean of the k values closest to the median.
//
// Each handler takes a batch X [..., n, d] (vmap's leading dimensions, every argument
// broadcast to them) and runs its kernel on the matrices one after another.
//
// Gram, RowSqDists and MomentProducts cut the columns into chunks of fixed size; threads
// take chunks from a shared counter, and the chunks' shares are added in chunk order in
// float64, so the results do not depend on the number of threads. The other kernels'
// columns are independent.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vectors as wide as the CPU's registers: 16 floats with AVX-512, else 8. On an Intel Xeon
// whose cores multiply-add twice as many floats a cycle in 512-bit vectors, the centred
// Gram matrix at 100 x 100k went 6.3 -> 5.7 ms (not 2x: there a tile's step waits on its
// R + S vector loads more than on its multiply-adds). The sums' rounding depends on the
// width, not on the number of threads.
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));

// Register tile: kR x kS accumulators, plus kS + 2 vectors in flight, in the 32 vector
// registers of AVX-512VL, or the 16 of AVX2.
#ifdef __AVX512VL__
constexpr int kR = 6, kS = 4;
#else
constexpr int kR = 4, kS = 3;
#endif
constexpr int64_t kChunk = 16384;      // most columns per chunk (a multiple of kLanes)
constexpr int64_t kChunks = 16;        // fewest chunks, where d has 1024 columns for each,
constexpr int64_t kMinChunk = 1024;    // so that the threads' shares differ by little
constexpr int64_t kBlockFloats = 131072;  // n x block floats per cache block (512 KiB)
constexpr int64_t kPartsBytes = int64_t{64} << 20;  // cap on the chunks' float64 shares

// Columns per cache block for n rows: a multiple of kLanes, at least 64.
inline int64_t BlockColumns(int64_t n) {
  return std::max<int64_t>(64, kBlockFloats / std::max<int64_t>(n, 1) / kLanes * kLanes);
}

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of the W lanes of v, its halves added lane by lane (so the adds need not wait),
// by shuffles: written as a loop over lanes, the compiler stored the vector and added its
// lanes one at a time with branches, and the Gram matrix's tiles, which sum 24 vectors
// per block, spent a fifth of their time there.
template <int W, class V>
inline float HalvesSum(V v) {
  if constexpr (W == 1) {
    return v[0];
  } else {
    return [&]<int... L>(std::integer_sequence<int, L...>) {
      return HalvesSum<W / 2>(__builtin_shufflevector(v, v, L...) +
                              __builtin_shufflevector(v, v, (L + W / 2)...));
    }(std::make_integer_sequence<int, W / 2>());
  }
}

inline double hsum(vf v) { return HalvesSum<kLanes>(v); }

// The kLanes floats at p in a register: pinned there on x86 so that the compiler does not fold
// the load into each of the multiply-adds that read it.
inline vf Row(const float* p) {
  vf v = load(p);
#ifdef __x86_64__
  asm("" : "+v"(v));
#endif
  return v;
}

// For the R rows x, x + d, ...: sq[r] += Σ_{c < len} (x_r[c] − s[c])², s = m where
// `sq_centred`, else 0, proj[r] += Σ_c (x_r[c] − m[c]) v[c] (m null: m = 0; sq or v null:
// that sum skipped) and copy[r] = x_r − m where copy[r] is not null, in one read of the
// rows, each vector of m and v loaded once for all R; float32 in kLanes-float lanes, the
// last len % kLanes terms and the totals in float64.
template <int R>
void RowGroup(const float* x, int64_t d, const float* m, bool sq_centred, const float* v,
              int64_t len, double* sq, double* proj, float* const* copy) {
  const int64_t vec = len / kLanes * kLanes;
  vf s[R] = {}, p[R] = {};
  for (int64_t c = 0; c < vec; c += kLanes) {
    const vf mc = m != nullptr ? load(m + c) : vf{};
    const vf vc = v != nullptr ? load(v + c) : vf{};
    for (int r = 0; r < R; ++r) {
      const vf xr = load(x + r * d + c), a = xr - mc;
      if (copy[r] != nullptr) std::memcpy(copy[r] + c, &a, sizeof a);
      const vf e = sq_centred ? a : xr;
      if (sq != nullptr) s[r] += e * e;
      if (v != nullptr) p[r] += a * vc;
    }
  }
  for (int r = 0; r < R; ++r) {
    double ts = hsum(s[r]), tp = hsum(p[r]);
    for (int64_t c = vec; c < len; ++c) {
      const float xr = x[r * d + c], a = xr - (m != nullptr ? m[c] : 0.f);
      if (copy[r] != nullptr) copy[r][c] = a;
      const float e = sq_centred ? a : xr;
      ts += double(e) * e;
      if (v != nullptr) tp += double(a) * v[c];
    }
    if (sq != nullptr) sq[r] += ts;
    if (v != nullptr) proj[r] += tp;
  }
}

// Where Rows copies the rows: row i to row dest[i] of a buffer (row stride `stride`), none
// where dest[i] < 0; dest null: row i to row i.
struct Copy {
  float* rows;  // or null: no copy
  int64_t stride;
  const int64_t* dest;
};

// RowGroup over all n rows of x (row stride d), four at a time.
void Rows(const float* x, int64_t n, int64_t d, const float* m, bool sq_centred, const float* v,
          int64_t len, double* sq, double* proj, Copy copy = {}) {
  using Fn = void (*)(const float*, int64_t, const float*, bool, const float*, int64_t, double*,
                      double*, float* const*);
  constexpr Fn kGroup[] = {RowGroup<1>, RowGroup<2>, RowGroup<3>, RowGroup<4>};
  for (int64_t i = 0; i < n; i += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, n - i));
    float* to[4] = {};
    for (int r = 0; copy.rows != nullptr && r < rows; ++r) {
      const int64_t row = copy.dest != nullptr ? copy.dest[i + r] : i + r;
      to[r] = row >= 0 ? copy.rows + row * copy.stride : nullptr;
    }
    kGroup[rows - 1](x + i * d, d, m, sq_centred, v, len, sq != nullptr ? sq + i : nullptr,
                     proj != nullptr ? proj + i : nullptr, to);
  }
}

// out[i + r, j + s] += Σ_{c < len} x[i + r, c] x[j + s, c], len a multiple of kLanes, x at
// the block's first column (row stride d). Each row's vector is loaded once per step and
// kept in a register (Row), so a step is R + S loads for R·S multiply-adds.
template <int R, int S>
void Tile(const float* x, int64_t d, int64_t i, int64_t j, int64_t len, double* out,
          int64_t n) {
  vf acc[R][S] = {};
  const float* xi = x + i * d;
  const float* xj = x + j * d;
  for (int64_t c = 0; c < len; c += kLanes) {
    vf b[S];
    for (int s = 0; s < S; ++s) b[s] = Row(xj + s * d + c);
    for (int r = 0; r < R; ++r) {
      const vf a = Row(xi + r * d + c);
      for (int s = 0; s < S; ++s) acc[r][s] += a * b[s];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) out[(i + r) * n + j + s] += hsum(acc[r][s]);
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, double*, int64_t);

template <int R, int... S>
constexpr std::array<TileFn, kS> TileRow(std::integer_sequence<int, S...>) {
  return {Tile<R, S + 1>...};
}

template <int... R>
constexpr std::array<std::array<TileFn, kS>, kR> TileTable(std::integer_sequence<int, R...>) {
  return {TileRow<R + 1>(std::make_integer_sequence<int, kS>{})...};
}

TileFn PickTile(int r, int s) {  // r ∈ [1, kR], s ∈ [1, kS]
  static constexpr auto table = TileTable(std::make_integer_sequence<int, kR>{});
  return table[r - 1][s - 1];
}

// K's upper triangle (and some of the lower) over the `len` columns of the block x0 (row
// stride d) into out.
void Tiles(const float* x0, int64_t n, int64_t d, int64_t len, double* out) {
  const int64_t vec = len / kLanes * kLanes;
  for (int64_t i = 0; i < n; i += kR) {
    const int r = static_cast<int>(std::min<int64_t>(kR, n - i));
    for (int64_t j = i; j < n; j += kS) {
      const int s = static_cast<int>(std::min<int64_t>(kS, n - j));
      PickTile(r, s)(x0, d, i, j, vec, out, n);
    }
  }
  for (int64_t i = 0; i < n; ++i)  // the last columns, fewer than kLanes
    for (int64_t j = i; j < n; ++j) {
      double t = 0;
      for (int64_t c = vec; c < len; ++c) t += double(x0[i * d + c]) * double(x0[j * d + c]);
      out[i * n + j] += t;
    }
}

// A buffer for a block of n rows of `len` floats in this thread, with a row stride that
// keeps every row on a 64-byte boundary (as XLA aligns its buffers: a vector load across
// two cache lines costs two). Rows then centres the block into it once, rather than every
// tile that loads a value centring it, and the tiles read rows that lie close together.
// Returns the buffer and its row stride.
std::pair<float*, int64_t> Buffer(int64_t n, int64_t len) {
  constexpr int64_t kLine = 64 / sizeof(float);
  const int64_t stride = (len + kLine - 1) / kLine * kLine;
  thread_local std::vector<float> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), n * stride + kLine));
  const auto start = reinterpret_cast<uintptr_t>(buffer.data());
  return {buffer.data() + ((-start) % 64) / sizeof(float), stride};
}

constexpr int kStrip = 4;  // column vectors whose moments are summed in registers together

// mean[c] = Σ_i a_i x0[i, c] and, given b, var[c] = Σ_i b_i (x0[i, c] − mean[c])² for the
// block's `len` columns, summed over the rows in order in float32, kStrip vectors of
// columns at a time in registers: the strip's rows are read for the mean and again, from
// L1, for the variance (Moments at 25 x 500k here, 1.7 -> 1.0 ms against a pass over the
// whole block for each, the sums loaded and stored for every row; C++ harness).
void BlockMoments(const float* __restrict x0, int64_t n, int64_t d, const float* __restrict a,
                  const float* __restrict b, int64_t len, float* __restrict mean,
                  float* __restrict var) {
  constexpr int64_t kWidth = kStrip * kLanes;
  int64_t c = 0;
  for (; c + kWidth <= len; c += kWidth) {
    vf mu[kStrip] = {};
    for (int64_t i = 0; i < n; ++i)
      for (int v = 0; v < kStrip; ++v) mu[v] += a[i] * load(x0 + i * d + c + v * kLanes);
    std::memcpy(mean + c, mu, sizeof mu);
    if (b == nullptr) continue;
    vf acc[kStrip] = {};
    for (int64_t i = 0; i < n; ++i)
      for (int v = 0; v < kStrip; ++v) {
        const vf t = load(x0 + i * d + c + v * kLanes) - mu[v];
        acc[v] += b[i] * (t * t);
      }
    std::memcpy(var + c, acc, sizeof acc);
  }
  for (; c < len; ++c) {
    float mu = 0.f, acc = 0.f;
    for (int64_t i = 0; i < n; ++i) mu += a[i] * x0[i * d + c];
    mean[c] = mu;
    if (b == nullptr) continue;
    for (int64_t i = 0; i < n; ++i) {
      const float t = x0[i * d + c] - mu;
      acc += b[i] * (t * t);
    }
    var[c] = acc;
  }
}

// A block's centre and projection vector (each null for none), from its first column.
struct Centre {
  const float* m;
  const float* v;
};

// The share of columns [lo, hi), a cache-sized block at a time, each block's centre and
// projection vector from prepare(x0, c0, len). With `gram`: of the Gram matrix of the
// block's rows less its centre (where it has one) into out, of the rows' uncentred squared
// norms into sq (unless null) and of the projections ⟨x_i − centre, v⟩ into proj; the
// Gram matrix is of the rows i with dest[i] >= 0 only (dest null: all), as row dest[i]
// of a [count, count] matrix. Without: of the rows' squared distances to the centre into
// sq and of the projections into proj (one read).
template <class Prepare>
void Share(const float* x, int64_t n, int64_t d, int64_t lo, int64_t hi, bool gram,
           Prepare prepare, double* out, double* sq, double* proj,
           const int64_t* dest = nullptr, int64_t count = -1) {
  const int64_t block = BlockColumns(n);
  for (int64_t c0 = lo; c0 < hi; c0 += block) {
    const int64_t len = std::min(block, hi - c0);
    const float* x0 = x + c0;
    const Centre at = prepare(x0, c0, len);
    if (!gram) {
      Rows(x0, n, d, at.m, true, at.v, len, sq, at.v != nullptr ? proj : nullptr);
      continue;
    }
    const auto [rows, stride] = Buffer(n, len);
    Rows(x0, n, d, at.m, false, at.v, len, sq, at.v != nullptr ? proj : nullptr,
         {rows, stride, dest});
    Tiles(rows, dest != nullptr ? count : n, stride, len, out);
  }
}

// The coordinate-wise direction u = scale · F ⊙ sign(μ − r) (the sign where `sign`, r
// zero where null), F = 1, μ, σ or μ − r: how the search attacks perturb the mean.
struct Direction {
  int64_t factor;  // 0: F = 1, 1: F = μ, 2: F = σ, 3: F = μ − r
  bool sign;
  float scale;
  const float* ref;  // absolute columns, or null
};

// Runs fn(k) for k = 0, ..., count − 1 on up to `threads` threads, each taking the next k
// from a shared counter.
template <class Fn>
void ParallelFor(int64_t count, int64_t threads, Fn fn) {
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t k; (k = next.fetch_add(1)) < count;) fn(k);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < std::min(threads, count); ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// Runs share(lo, hi, part) for every chunk [lo, hi) of the d columns on up to `threads`
// threads, `part` a zeroed float64 array of `size` values, and returns the sum of the
// parts in chunk order (so the same for any number of threads).
template <class ShareFn>
std::vector<double> SumOverChunks(int64_t d, int64_t size, int64_t threads, ShareFn share) {
  int64_t chunks = std::max({int64_t{1}, (d + kChunk - 1) / kChunk, std::min(kChunks, d / kMinChunk)});
  chunks = std::min(chunks, std::max<int64_t>(1, kPartsBytes / (8 * size)));
  const int64_t width = ((d + chunks - 1) / chunks + kLanes - 1) / kLanes * kLanes;
  chunks = std::max<int64_t>(1, (d + width - 1) / width);
  std::vector<double> parts(static_cast<size_t>(chunks * size), 0.0);
  ParallelFor(chunks, threads, [&](int64_t c) {
    share(c * width, std::min(d, (c + 1) * width), parts.data() + c * size);
  });
  std::vector<double> sum(static_cast<size_t>(size), 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < size; ++i) sum[i] += parts[c * size + i];
  return sum;
}

// K [n, n] in float32 from the upper triangle of the float64 sums s (row-major m x m) of
// the rows i with dest[i] >= 0, row i being row dest[i] of s (dest null: all, m = n);
// zero between the other rows.
void Symmetric(const double* s, int64_t n, const int64_t* dest, int64_t m, float* k) {
  const auto row = [&](int64_t i) { return dest != nullptr ? dest[i] : i; };
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j)
      k[i * n + j] = k[j * n + i] =
          row(i) >= 0 && row(j) >= 0 ? static_cast<float>(s[row(i) * m + row(j)]) : 0.f;
}

void Gram(const float* x, int64_t n, int64_t d, const float* m, const float* w, const float* v,
          int64_t threads, float* k, float* sq, float* proj) {
  std::fill(proj, proj + n, 0.f);
  if (n == 0 || d == 0) {  // nothing to sum (and no chunk to cut)
    std::fill(k, k + n * n, 0.f);
    std::fill(sq, sq + n, 0.f);
    return;
  }
  const int64_t size = n * n + 2 * n;
  const int64_t block = BlockColumns(n);
  const auto sum = SumOverChunks(d, size, threads, [&](int64_t lo, int64_t hi, double* out) {
    std::vector<float> mean(w != nullptr ? block : 0);
    auto prepare = [&](const float* x0, int64_t c0, int64_t len) {
      if (w != nullptr) BlockMoments(x0, n, d, w, nullptr, len, mean.data(), nullptr);
      const float* m0 = w != nullptr ? mean.data() : m != nullptr ? m + c0 : nullptr;
      return Centre{m0, v != nullptr ? v + c0 : nullptr};
    };
    Share(x, n, d, lo, hi, true, prepare, out, out + n * n, out + n * n + n);
  });
  Symmetric(sum.data(), n, nullptr, n, k);
  for (int64_t i = 0; i < n; ++i) {
    sq[i] = static_cast<float>(sum[n * n + i]);
    if (v != nullptr) proj[i] = static_cast<float>(sum[n * n + n + i]);
  }
}

// ‖x_i − m‖² (m null: ‖x_i‖²) and, given v, ⟨x_i − m, v⟩ for every row, f32 within
// kLanes-float lanes, float64 across chunks.
void RowSqDists(const float* x, int64_t n, int64_t d, const float* m, const float* v,
                int64_t threads, float* sq, float* proj) {
  std::fill(proj, proj + n, 0.f);
  if (n == 0 || d == 0) {
    std::fill(sq, sq + n, 0.f);
    return;
  }
  const auto sum = SumOverChunks(d, 2 * n, threads, [&](int64_t lo, int64_t hi, double* part) {
    const float* ml = m != nullptr ? m + lo : nullptr;
    Rows(x + lo, n, d, ml, true, v != nullptr ? v + lo : nullptr, hi - lo, part,
         v != nullptr ? part + n : nullptr);
  });
  for (int64_t i = 0; i < n; ++i) {
    sq[i] = static_cast<float>(sum[i]);
    if (v != nullptr) proj[i] = static_cast<float>(sum[n + i]);
  }
}

// μ_c = Σ_i a_i x_ic and var_c = Σ_i b_i (x_ic − μ_c)² for every column c, summed over the
// rows in order in float32 while a cache-sized block of columns is read twice; the
// columns are independent, so threads split them freely.
void Moments(const float* x, int64_t n, int64_t d, const float* a, const float* b,
             int64_t threads, float* mu, float* var) {
  const int64_t block = BlockColumns(n);
  ParallelFor((d + block - 1) / block, threads, [&](int64_t k) {
    const int64_t c0 = k * block, len = std::min(block, d - c0);
    BlockMoments(x + c0, n, d, a, b, len, mu + c0, var + c0);
  });
}

// u[c] = scale · F[c] ⊙ sign(t[c]) (the sign where Sign), t = μ − r (r null: 0), F the
// factor numbered F in Direction, for the block's `len` columns. One loop per (F, Sign),
// which the compiler vectorizes: a loop choosing both per column ran 1.5 ms slower at
// 25 x 500k here, its branches mispredicted on the signs.
template <int F, bool Sign>
void BlockDirection(const float* __restrict m, const float* __restrict var,
                    const float* __restrict r, float scale, int64_t len, float* __restrict u) {
  for (int64_t c = 0; c < len; ++c) {
    const float t = m[c] - (r != nullptr ? r[c] : 0.f);
    float f = F == 0 ? 1.f : F == 1 ? m[c] : F == 2 ? std::sqrt(var[c]) : t;
    if (Sign) f *= t > 0.f ? 1.f : t < 0.f ? -1.f : t;  // XLA's sign: ±0, NaN kept
    u[c] = scale * f;
  }
}

using DirectionFn = void (*)(const float*, const float*, const float*, float, int64_t, float*);
constexpr DirectionFn kDirections[4][2] = {
    {BlockDirection<0, false>, BlockDirection<0, true>},
    {BlockDirection<1, false>, BlockDirection<1, true>},
    {BlockDirection<2, false>, BlockDirection<2, true>},
    {BlockDirection<3, false>, BlockDirection<3, true>}};

// Moments and the products of the search attacks, in one read of X: for every block of
// columns, while it is in cache, μ and var as Moments does, σ = √var, the direction u
// (Direction), and the block's share of ⟨x_i − μ, u⟩ and of K = (X − 1μᵀ)(X − 1μᵀ)ᵀ
// (`gram`; only between rows with a_i ≠ 0, zero elsewhere: the searches need no more, and
// STRIKE's n − 2f rows at n = 100 take a third of the work of all n) or of ‖x_i − μ‖².
// μ and u are written column by column, the sums added over chunks as in Gram.
void MomentProducts(const float* x, int64_t n, int64_t d, const float* a, const float* b,
                    Direction dir, bool gram, int64_t threads, float* mu, float* u,
                    float* second, float* proj) {
  std::vector<int64_t> dest(n, -1);  // the rows with a_i ≠ 0, numbered in order
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i)
    if (a[i] != 0.f) dest[i] = m++;
  const int64_t size = (gram ? m * m : n) + n;
  if (n == 0 || d == 0) {
    std::fill(second, second + (gram ? n * n : n), 0.f);
    std::fill(proj, proj + n, 0.f);
    return;
  }
  const int64_t block = BlockColumns(n);
  const auto sum = SumOverChunks(d, size, threads, [&](int64_t lo, int64_t hi, double* out) {
    std::vector<float> var(block);
    auto prepare = [&](const float* x0, int64_t c0, int64_t len) {
      float* m0 = mu + c0;
      float* u0 = u + c0;
      BlockMoments(x0, n, d, a, dir.factor == 2 ? b : nullptr, len, m0, var.data());
      const float* r0 = dir.ref != nullptr ? dir.ref + c0 : nullptr;
      kDirections[dir.factor][dir.sign](m0, var.data(), r0, dir.scale, len, u0);
      return Centre{m0, u0};
    };
    Share(x, n, d, lo, hi, gram, prepare, out, gram ? nullptr : out, out + size - n,
          dest.data(), m);
  });
  if (gram) Symmetric(sum.data(), n, dest.data(), m, second);
  for (int64_t i = 0; i < n; ++i) {
    if (!gram) second[i] = static_cast<float>(sum[i]);
    proj[i] = static_cast<float>(sum[size - n + i]);
  }
}

// Batcher's odd-even merge sorting network for n inputs (ops.sorting_network, the same
// pairs in the same order): applying the comparators (a, b), a < b, in order sorts any n
// values. Only its merges of two runs of p rows, from <= p < to, are listed; those with
// p < to compare rows within aligned groups of `to` rows.
constexpr std::vector<std::pair<int32_t, int32_t>> SortingNetwork(int64_t n, int64_t from = 1,
                                                                  int64_t to = INT64_MAX) {
  std::vector<std::pair<int32_t, int32_t>> pairs;
  for (int64_t p = from; p < std::min(n, to); p *= 2)
    for (int64_t k = p; k >= 1; k /= 2)
      for (int64_t j = k % p; j < n - k; j += 2 * k)
        for (int64_t i = 0; i < std::min(k, n - j - k); ++i)
          if ((i + j) / (2 * p) == (i + j + k) / (2 * p))
            pairs.emplace_back(static_cast<int32_t>(i + j), static_cast<int32_t>(i + j + k));
  return pairs;
}

// Rows sorted within aligned groups of kGroup in registers before the rest of the network.
constexpr int kGroup = 16;
constexpr auto kGroupNetwork = [] {
  std::array<std::pair<int32_t, int32_t>, SortingNetwork(kGroup).size()> pairs{};
  std::ranges::copy(SortingNetwork(kGroup), pairs.begin());
  return pairs;
}();

constexpr int kSortVectors = 4;  // column vectors sorted together: 1, 2, 8 were slower here
constexpr int64_t kSortTask = 64;  // column vectors per thread task

// A comparator as compare-and-select (ops.sorted_rows' form: equal values and NaN swap).
inline void Compare(vf& a, vf& b) {
  const vf p = a, q = b;
  const auto lower = p < q;
  a = lower ? p : q;
  b = lower ? q : p;
}

// The rows a sorting kernel sorts, n of them: X's rows, or the mixed rows M X for a
// mixing matrix M [n, p] (p = X's rows; null: none), each formed for kSortVectors x kLanes
// columns at a time and never written. Rows with valid[i] == 0 (valid non-null) are then
// replaced by fill[i].
struct SortInput {
  const float* x;
  int64_t p, d;     // X [p, d]
  const float* mix;  // M [n, p], or null (then n = p)
  int64_t n;
  const float* valid;
  const float* fill;
};

// S[i] = Σ_j M[i, j] X[j] for R rows i of M (at m, row stride p), on the buffered rows
// X [p][kSortVectors]: each of X's vectors is loaded once for R rows and each M[i, j]
// once for kSortVectors vectors, as in Gram's tiles; summed over j in order in float32.
template <int R>
void MixTile(const vf* X, int64_t p, const float* m, vf* S) {
  constexpr int V = kSortVectors;
  vf acc[R][V] = {};
  for (int64_t j = 0; j < p; ++j) {
    vf x[V];
    for (int v = 0; v < V; ++v) x[v] = Row(reinterpret_cast<const float*>(X + j * V + v));
    for (int r = 0; r < R; ++r) {
      const float w = m[r * p + j];
      for (int v = 0; v < V; ++v) acc[r][v] += w * x[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) S[r * V + v] = acc[r][v];
}

constexpr int kMixRows = 6;

template <int... R>
constexpr auto MixTiles(std::integer_sequence<int, R...>) {
  return std::array{MixTile<R + 1>...};
}

// out[c] = reduce(S)[c] for every column c, S [n] the column's values of the input's rows
// in increasing order (S_0 <= ... <= S_{n−1}): kSortVectors x kLanes columns at a time,
// the rows' vectors are sorted by compare-and-select comparators (ops.sorted_rows' exact
// form: ties and NaN swap), in registers within aligned groups of kGroup rows, then in a
// buffer of n x kSortVectors vectors that stays in L1. The columns are independent, so
// threads split them freely.
template <class Reduce>
void SortedColumns(const SortInput& in, int64_t threads, float* out, Reduce reduce) {
  constexpr int V = kSortVectors;
  constexpr auto kMix = MixTiles(std::make_integer_sequence<int, kMixRows>());
  const int64_t n = in.n, p = in.p, d = in.d;
  const int64_t groups = n / kGroup;  // full groups, sorted in registers
  const auto pairs = SortingNetwork(n, kGroup);
  const auto tail = SortingNetwork(n, 1, kGroup);  // the partial group's are among these
  const int64_t vectors = (d + kLanes - 1) / kLanes;
  ParallelFor((vectors + kSortTask - 1) / kSortTask, threads, [&](int64_t task) {
    std::vector<vf> S(n * V), X(in.mix != nullptr ? p * V : 0);
    vf* rows = in.mix != nullptr ? X.data() : S.data();  // where X's rows are read to
    const int64_t end = std::min(vectors, (task + 1) * kSortTask);
    for (int64_t t = task * kSortTask; t < end; t += V) {
      const int64_t c = t * kLanes, len = std::min<int64_t>(V * kLanes, d - c);
      for (int64_t i = 0; i < p; ++i) {
        vf* row = rows + i * V;
        if (len == V * kLanes) {
          for (int v = 0; v < V; ++v) row[v] = load(in.x + i * d + c + v * kLanes);
        } else {
          for (int v = 0; v < V; ++v) row[v] = vf{};
          std::memcpy(row, in.x + i * d + c, sizeof(float) * len);
        }
      }
      for (int64_t i = 0; in.mix != nullptr && i < n; i += kMixRows) {
        const int64_t r = std::min<int64_t>(kMixRows, n - i);
        kMix[r - 1](X.data(), p, in.mix + i * p, S.data() + i * V);
      }
      for (int64_t i = 0; in.valid != nullptr && i < n; ++i)
        if (in.valid[i] == 0.f)
          for (int v = 0; v < V; ++v) S[i * V + v] = vf{} + in.fill[i];
      for (int64_t g = 0; g < groups; ++g)
        for (int v = 0; v < V; ++v) {
          vf R[kGroup];
          for (int i = 0; i < kGroup; ++i) R[i] = S[(g * kGroup + i) * V + v];
#pragma GCC unroll 256
          for (const auto [a, b] : kGroupNetwork) Compare(R[a], R[b]);
          for (int i = 0; i < kGroup; ++i) S[(g * kGroup + i) * V + v] = R[i];
        }
      for (const auto [a, b] : tail)
        if (a >= groups * kGroup)
          for (int v = 0; v < V; ++v) Compare(S[a * V + v], S[b * V + v]);
      for (const auto [a, b] : pairs)
        for (int v = 0; v < V; ++v) Compare(S[a * V + v], S[b * V + v]);
      vf r[V];
      for (int v = 0; v < V; ++v) r[v] = reduce(S.data() + v, V);
      if (len == V * kLanes)
        std::memcpy(out + c, r, sizeof r);
      else
        std::memcpy(out + c, r, sizeof(float) * len);
    }
  });
}

typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

// Knuth's TwoSum (ops.two_sum): s = fl(a + b) and e with a + b = s + e exactly.
inline std::pair<vf, vf> TwoSum(vf a, vf b) {
  const vf s = a + b, bb = s - a;
  return {s, (a - (s - bb)) + (b - bb)};
}

// Σ_r w_r S_r per column over the ranks with w_r ≠ 0, added in rank order (ops.sorted_sum).
void SortedSum(const SortInput& in, const float* w, int64_t threads, float* out) {
  const int64_t n = in.n;
  SortedColumns(in, threads, out, [&](const vf* S, int64_t V) {
    vf acc = {};
    bool first = true;
    for (int64_t r = 0; r < n; ++r) {
      if (w[r] == 0.f) continue;
      const vf term = w[r] * S[r * V];
      acc = first ? term : acc + term;
      first = false;
    }
    return acc;
  });
}

// Per column, the mean of the k values closest to the median (S_lo + S_hi)/2, lo = (n − 1)/2,
// hi = n/2 (aggregators.coordinate.closest_mean): the window S_c .. S_{c+k−1} starts at c, the
// number of s < starts with S_s + S_{s+k} < S_lo + S_hi (exact sums, S_{s+k} = +inf past
// S_{n−1}), and its values are added in rank order.
void ClosestMean(const SortInput& in, int64_t k, int64_t starts, int64_t threads, float* out) {
  const int64_t n = in.n;
  k = std::clamp<int64_t>(k, 1, n);
  const vf inf = vf{} + INFINITY;
  SortedColumns(in, threads, out, [&](const vf* S, int64_t V) {
    const auto [ms, me] = TwoSum(S[(n - 1) / 2 * V], S[n / 2 * V]);
    vi c = {};
    for (int64_t s = 0; s < starts; ++s) {
      const auto [as, ae] = TwoSum(S[s * V], s + k < n ? S[(s + k) * V] : inf);
      c -= (as < ms) | ((as == ms) & (ae < me));  // a true comparison is −1
    }
    vf acc = {};
    for (int64_t r = 0; r < n; ++r) {
      const vi rank = vi{} + static_cast<int32_t>(r);
      acc = acc + ((rank >= c) & (rank < c + static_cast<int32_t>(k)) ? S[r * V] : vf{});
    }
    return acc / static_cast<float>(k);
  });
}

// A batch of matrices X [..., n, d] (leading dimensions from vmap, which broadcasts every
// argument to them): how many, and each one's n and d.
struct Batch {
  int64_t count, n, d;
};

bool ReadBatch(ffi::Buffer<ffi::F32>& x, Batch& batch) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return false;
  batch = {1, dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t i = 0; i + 2 < dims.size(); ++i) batch.count *= dims[i];
  return true;
}

// An argument of `size` values per matrix: its data, or null for an optional one given
// empty; `ok` false unless it has `size` values per matrix (or is empty and optional).
// Element b of the batch starts at Part(data, b, size).
const float* Vector(ffi::Buffer<ffi::F32>& v, int64_t size, const Batch& batch, bool optional,
                    bool& ok) {
  const size_t count = v.element_count();
  if (optional && count == 0) return nullptr;
  ok = ok && count == static_cast<size_t>(size * batch.count);
  return v.typed_data();
}

template <class T>
T* Part(T* data, int64_t b, int64_t size) {
  return data != nullptr ? data + b * size : nullptr;
}

ffi::Error GramImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> center,
                    ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> project,
                    ffi::ResultBuffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> sq,
                    ffi::ResultBuffer<ffi::F32> proj, int64_t threads) {
  Batch B;
  if (!ReadBatch(x, B)) return ffi::Error::InvalidArgument("gram: X must be [..., n, d]");
  const int64_t n = B.n, d = B.d;
  bool ok = true;
  const float* m = Vector(center, d, B, true, ok);
  const float* w = Vector(weights, n, B, true, ok);
  const float* v = Vector(project, d, B, true, ok);
  if (!ok || (m != nullptr && w != nullptr))
    return ffi::Error::InvalidArgument(
        "gram: a centre [d], or row weights [n], or neither; a vector [d] or none");
  for (int64_t b = 0; b < B.count; ++b)
    Gram(x.typed_data() + b * n * d, n, d, Part(m, b, d), Part(w, b, n), Part(v, b, d),
         std::max<int64_t>(1, threads), k->typed_data() + b * n * n, sq->typed_data() + b * n,
         proj->typed_data() + b * n);
  return ffi::Error::Success();
}

ffi::Error RowSqDistsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> center,
                          ffi::Buffer<ffi::F32> project, ffi::ResultBuffer<ffi::F32> sq,
                          ffi::ResultBuffer<ffi::F32> proj, int64_t threads) {
  Batch B;
  if (!ReadBatch(x, B)) return ffi::Error::InvalidArgument("row_sq_dists: X must be [..., n, d]");
  const int64_t n = B.n, d = B.d;
  bool ok = true;
  const float* m = Vector(center, d, B, true, ok);
  const float* v = Vector(project, d, B, true, ok);
  if (!ok) return ffi::Error::InvalidArgument("row_sq_dists: a centre and a vector [d], or none");
  for (int64_t b = 0; b < B.count; ++b)
    RowSqDists(x.typed_data() + b * n * d, n, d, Part(m, b, d), Part(v, b, d),
               std::max<int64_t>(1, threads), sq->typed_data() + b * n,
               proj->typed_data() + b * n);
  return ffi::Error::Success();
}

ffi::Error MomentsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> mu, ffi::ResultBuffer<ffi::F32> var,
                       int64_t threads) {
  Batch B;
  if (!ReadBatch(x, B)) return ffi::Error::InvalidArgument("moments: X must be [..., n, d]");
  const int64_t n = B.n, d = B.d;
  bool ok = true;
  const float* wa = Vector(a, n, B, false, ok);
  const float* wb = Vector(b, n, B, false, ok);
  if (!ok) return ffi::Error::InvalidArgument("moments: the row weights must be [n]");
  for (int64_t e = 0; e < B.count; ++e)
    Moments(x.typed_data() + e * n * d, n, d, wa + e * n, wb + e * n,
            std::max<int64_t>(1, threads), mu->typed_data() + e * d, var->typed_data() + e * d);
  return ffi::Error::Success();
}

ffi::Error MomentProductsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                              ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> ref,
                              ffi::ResultBuffer<ffi::F32> mu, ffi::ResultBuffer<ffi::F32> u,
                              ffi::ResultBuffer<ffi::F32> second,
                              ffi::ResultBuffer<ffi::F32> proj, int64_t threads, bool gram,
                              int64_t factor, bool sign, float scale) {
  Batch B;
  if (!ReadBatch(x, B))
    return ffi::Error::InvalidArgument("moment_products: X must be [..., n, d]");
  const int64_t n = B.n, d = B.d;
  bool ok = factor >= 0 && factor <= 3;
  const float* wa = Vector(a, n, B, false, ok);
  const float* wb = Vector(b, n, B, false, ok);
  const float* r = Vector(ref, d, B, true, ok);
  if (!ok)
    return ffi::Error::InvalidArgument(
        "moment_products: row weights [n], a reference [d] or none, factor 0 to 3");
  const int64_t size = gram ? n * n : n;
  for (int64_t e = 0; e < B.count; ++e)
    MomentProducts(x.typed_data() + e * n * d, n, d, wa + e * n, wb + e * n,
                   Direction{factor, sign, scale, Part(r, e, d)}, gram,
                   std::max<int64_t>(1, threads), mu->typed_data() + e * d,
                   u->typed_data() + e * d, second->typed_data() + e * size,
                   proj->typed_data() + e * n);
  return ffi::Error::Success();
}

// A sorting kernel's input for every matrix of the batch: X [..., p, d], the mixing
// matrix M [..., n, p] or empty (then n = p), and valid, fill [..., n] or both empty.
// Null where the arguments do not fit.
std::vector<SortInput> ReadSortInputs(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& mix,
                                      ffi::Buffer<ffi::F32>& valid, ffi::Buffer<ffi::F32>& fill,
                                      Batch& B) {
  if (!ReadBatch(x, B)) return {};
  const auto dims = mix.dimensions();
  const bool mixed = mix.element_count() > 0;
  if (mixed && (dims.size() < 2 || dims[dims.size() - 1] != B.n)) return {};
  const int64_t n = mixed ? dims[dims.size() - 2] : B.n;
  bool ok = true;
  const float* m = Vector(mix, n * B.n, B, true, ok);
  const float* v = Vector(valid, n, B, true, ok);
  const float* f = Vector(fill, n, B, true, ok);
  if (!ok || (v == nullptr) != (f == nullptr) || n < 1) return {};
  std::vector<SortInput> inputs;
  for (int64_t e = 0; e < B.count; ++e)
    inputs.push_back({x.typed_data() + e * B.n * B.d, B.n, B.d, Part(m, e, n * B.n), n,
                      Part(v, e, n), Part(f, e, n)});
  return inputs;
}

ffi::Error SortedSumImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mix,
                         ffi::Buffer<ffi::F32> valid, ffi::Buffer<ffi::F32> fill,
                         ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out,
                         int64_t threads) {
  Batch B;
  const auto inputs = ReadSortInputs(x, mix, valid, fill, B);
  bool ok = !inputs.empty();
  const int64_t n = ok ? inputs[0].n : 0;
  const float* rank_w = Vector(w, n, B, false, ok);
  if (!ok)
    return ffi::Error::InvalidArgument(
        "sorted_sum: X [..., p, d], mixing [..., n, p] or none, valid and fill [n] or "
        "neither, weights [n]");
  for (int64_t e = 0; e < B.count; ++e)
    SortedSum(inputs[e], rank_w + e * n, std::max<int64_t>(1, threads),
              out->typed_data() + e * B.d);
  return ffi::Error::Success();
}

ffi::Error ClosestMeanImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mix,
                           ffi::Buffer<ffi::F32> valid, ffi::Buffer<ffi::F32> fill,
                           ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> out,
                           int64_t threads, int64_t starts) {
  Batch B;
  const auto inputs = ReadSortInputs(x, mix, valid, fill, B);
  bool ok = !inputs.empty();
  const float* size = Vector(k, 1, B, false, ok);
  if (!ok || starts < 0 || starts > inputs[0].n)
    return ffi::Error::InvalidArgument(
        "closest_mean: X [..., p, d], mixing [..., n, p] or none, valid and fill [n] or "
        "neither, k [1], 0 <= starts <= n");
  for (int64_t e = 0; e < B.count; ++e)
    ClosestMean(inputs[e], static_cast<int64_t>(size[e]), starts, std::max<int64_t>(1, threads),
                out->typed_data() + e * B.d);
  return ffi::Error::Success();
}

// `binding` with Args float32 buffer arguments, then Rets (at least one) float32 buffer
// results. (Each step returns a new binding, which cannot be copied or moved.)
template <int Args, int Rets, class Binding>
auto Buffers(Binding&& binding) {
  static_assert(Rets > 0);
  if constexpr (Args > 0) {
    return Buffers<Args - 1, Rets>(std::move(binding).template Arg<ffi::Buffer<ffi::F32>>());
  } else if constexpr (Rets > 1) {
    return Buffers<0, Rets - 1>(std::move(binding).template Ret<ffi::Buffer<ffi::F32>>());
  } else {
    return std::move(binding).template Ret<ffi::Buffer<ffi::F32>>();
  }
}

}  // namespace

// (The parentheses keep the template arguments' commas from the macro.)
XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxByzGram, GramImpl,
                              (Buffers<4, 3>(ffi::Ffi::Bind()).Attr<int64_t>("threads")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxByzRowSqDists, RowSqDistsImpl,
                              (Buffers<3, 2>(ffi::Ffi::Bind()).Attr<int64_t>("threads")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxByzMoments, MomentsImpl,
                              (Buffers<3, 2>(ffi::Ffi::Bind()).Attr<int64_t>("threads")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxByzMomentProducts, MomentProductsImpl,
                              (Buffers<4, 4>(ffi::Ffi::Bind())
                                   .Attr<int64_t>("threads")
                                   .Attr<bool>("gram")
                                   .Attr<int64_t>("factor")
                                   .Attr<bool>("sign")
                                   .Attr<float>("scale")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxByzSortedSum, SortedSumImpl,
                              (Buffers<5, 1>(ffi::Ffi::Bind()).Attr<int64_t>("threads")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxByzClosestMean, ClosestMeanImpl,
                              (Buffers<5, 1>(ffi::Ffi::Bind())
                                   .Attr<int64_t>("threads")
                                   .Attr<int64_t>("starts")));
