// convlab's CPU kernels for 1x1 convolutions, on AVX-512 register tiles:
//   linear_out     out = x @ w^T + bias (fp32 and bf16), the channels_last forward on the (N*H*W, C) rows;
//   images_out     out[n] = w @ x[n] + bias[:, None] (fp32), NCHW images, the pixels as columns;
//   rows_backward  dW, db and dX of the channels_last layer in one pass over dY (fp32 and bf16);
//   images_backward  the same for NCHW images (fp32).
//
// oneDNN's matmul (onednn_matmul.cpp) takes no bias, so the bias cost a second pass over the output, and oneDNN's
// inner product, which adds it as it writes, ran at 0.84-0.94x torch's convolution on six fp32 layers on two
// threads (benchmarks/README.md). Here each 6-row x 64-column tile of out (8 x 48, 12 x 32 or 24 x 16 on
// narrower outputs, see linear_vectors) is 24 vector accumulators that start at the bias, run the reduction and
// are stored once. Outputs of at least `stream_min_bytes` are written with non-temporal stores, which skip reading
// the lines into the cache first. bf16 operands are multiplied in pairs (AVX512_BF16's dot product), accumulated
// in fp32 and rounded once, at the store, as oneDNN does. On NCHW images
// the panels are the images' own channel rows, so the bias (one per output channel, a tile row) again costs no
// pass. Built by models/native.py; compiled for any x86-64 CPU, each dtype runs only where the CPU reports its
// instructions (AVX-512F; for bf16 also AVX512_BF16).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 64;      // NR: columns of w^T packed together, at most four 16-lane vectors
constexpr int kTileAcc = 24;        // a tile of R rows x V vectors, R = 24 / V: 24 of the 32 zmm registers accumulate
constexpr int64_t kTaskRows = 48;   // rows of one parallel task
constexpr int64_t kTaskPanels = 2;  // panels of one parallel task

bool cpu_supports(at::ScalarType dtype) {
#if defined(__x86_64__)
  if (dtype == at::kFloat) return __builtin_cpu_supports("avx512f");
  if (dtype == at::kBFloat16) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

using bf16_bits = uint16_t;  // a bfloat16 as it lies in memory
using pair_bits = uint32_t;  // two bf16 side by side

// Per dtype: k values per packed step (bf16 multiplies pairs) and the reduction block. fp32 blocks of 256 keep
// a panel's slice at 64 KiB, in L2; bf16 reduces in one block, since a partial sum rounded to bf16 between
// blocks would lose precision.
template <typename T> struct Layout;
template <> struct Layout<float> {
  static constexpr int64_t kPack = 1, kDepth = 256;
};
template <> struct Layout<bf16_bits> {
  static constexpr int64_t kPack = 2, kDepth = std::numeric_limits<int64_t>::max();
};

// n rounded up to a whole number of `step`s: a width padded to whole panels or vectors.
constexpr int64_t round_up(int64_t n, int64_t step) { return (n + step - 1) / step * step; }

#if defined(__x86_64__)

// Stores a tile's R x V accumulators into out (rows ld apart), lanes masked.
// (always inlined and fully unrolled, up to 24 rows: a loop left over the rows would put acc in memory)
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void store_tile(const __m512 (&acc)[R][V], float* out,
                                                                         int64_t ld, const __mmask16* masks) {
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(out + r * ld + 16 * v, masks[v], acc[r][v]);
  }
}

// Loads them back (masked lanes zero).
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void load_tile(__m512 (&acc)[R][V], const float* in,
                                                                        int64_t ld, const __mmask16* masks) {
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_maskz_loadu_ps(masks[v], in + r * ld + 16 * v);
  }
}

// Zeroes them: a tile of partial sums starts here, and is added to its running total once, at the end (see
// add_tile). Summing into the total itself loses the terms' low bits once it is large: dW of channels_last
// 32->256 @56 (N=8, 25088 rows) was off by 2.4e-3 against float64, ten times F.conv2d's error.
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void zero_tile(__m512 (&acc)[R][V]) {
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
}

// out[r * ld + 16v] += acc[r][v], lanes masked.
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void add_tile(const __m512 (&acc)[R][V], float* out, int64_t ld,
                                                                       const __mmask16* masks) {
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      float* o = out + r * ld + 16 * v;
      _mm512_mask_storeu_ps(o, masks[v], _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], o), acc[r][v]));
    }
  }
}

// acc[r][v] += a[r * lda] * b[v]: the rank-1 update at the heart of every fp32 tile here.
template <int R, int V>
__attribute__((target("avx512f"), always_inline)) inline void rank1(__m512 (&acc)[R][V], const float* a, int64_t lda,
                                                                    const __m512 (&b)[V]) {
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    const __m512 x = _mm512_set1_ps(a[r * lda]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
  }
}

// `count` tiles of R rows, one after another down the rows: c[0:R, 0:16V) (columns masked) = start +
// sum_k a[r, k] * panel[k, :], start being the bias (first reduction block) or what c holds (later ones).
// The panel's rows lie `ldb` apart. kStream: non-temporal stores (full, aligned tiles of the last block only).
// kImages (images_out): the bias is one value per row, not per column, and the panel is the input itself, not
// a zero-padded copy, so its loads are masked too (a last, partial panel must not read past the tensor).
template <int R, int V, bool kStream, bool kImages = false>
__attribute__((target("avx512f"))) void tiles(int64_t count, const float* a, int64_t lda, const float* panel,
                                               int64_t ldb, int64_t depth, const float* bias, float* c, int64_t ldc,
                                               const __mmask16* masks) {
  for (int64_t t = 0; t < count; ++t, a += R * lda, c += R * ldc) {
    __m512 acc[R][V];  // the loops over r and v unroll fully (the pragmas), so acc lives in registers
    if (!bias) {
      load_tile<R, V>(acc, c, ldc, masks);
    } else {
#pragma GCC unroll 24
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[r][v] = kImages ? _mm512_set1_ps(bias[t * R + r]) : _mm512_loadu_ps(bias + 16 * v);
      }
    }
    for (int64_t k = 0; k < depth; ++k) {
      const float* p = panel + k * ldb;
      __m512 b[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        if constexpr (kImages) {
          if (t == 0) _mm_prefetch(reinterpret_cast<const char*>(p + 16 * V + 16 * v), _MM_HINT_T0);  // see images_task
          b[v] = _mm512_maskz_loadu_ps(masks[v], p + 16 * v);
        } else {
          b[v] = _mm512_loadu_ps(p + 16 * v);
        }
      }
      rank1<R, V>(acc, a + k, lda, b);
    }
    if constexpr (kStream) {
#pragma GCC unroll 24
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) _mm512_stream_ps(c + r * ldc + 16 * v, acc[r][v]);
      }
    } else {
      store_tile<R, V>(acc, c, ldc, masks);
    }
  }
}

// The same for bf16: the panel holds pairs (w[j, 2i], w[j, 2i + 1]) side by side, `depth` is even, and the
// bias (fp32) is always given.
template <int R, int V, bool kStream, bool kImages = false>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void tiles(
    int64_t count, const bf16_bits* a, int64_t lda, const bf16_bits* panel, int64_t ldb, int64_t depth,
    const float* bias, bf16_bits* c, int64_t ldc, const __mmask16* masks) {
  static_assert(!kImages, "images_out is fp32 only");
  for (int64_t t = 0; t < count; ++t, a += R * lda, c += R * ldc) {
    __m512 acc[R][V];
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_loadu_ps(bias + 16 * v);
    }
    for (int64_t k = 0; k < depth; k += 2) {
      const bf16_bits* p = panel + k * ldb;  // pairs: ldb is the panel's width, elements per pair row
      __m512bh b[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(p + 32 * v);
#pragma GCC unroll 24
      for (int r = 0; r < R; ++r) {
        int32_t pair;  // a[r, k] and a[r, k + 1], broadcast to all 16 lanes
        std::memcpy(&pair, a + r * lda + k, sizeof pair);
        const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, b[v]);
      }
    }
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(acc[r][v]);  // round to nearest even
        if constexpr (kStream) {
          _mm256_stream_si256(reinterpret_cast<__m256i*>(c + r * ldc + 16 * v), rounded);
        } else {
          _mm256_mask_storeu_epi16(c + r * ldc + 16 * v, masks[v], rounded);
        }
      }
    }
  }
}

// Lane masks of a panel with `cols` (at most kPanel) columns: vector v holds columns [16v, 16v + 16).
void panel_masks(int64_t cols, __mmask16* masks) {
  for (int v = 0; v < 4; ++v) {
    const int64_t left = std::clamp<int64_t>(cols - 16 * v, 0, 16);
    masks[v] = static_cast<__mmask16>((1u << left) - 1u);
  }
}

// `f.template operator()<N>(start)` for the runtime count `n` in [1, kMax] (nothing for 0): the instantiation for
// exactly that many. How every kernel here finishes the rows (or channels) its whole tiles leave, and picks its
// vectors per panel.
template <int kMax, typename F>
void dispatch_count(int64_t n, int64_t start, F&& f) {
  if constexpr (kMax > 0) {
    if (n == kMax) {
      f.template operator()<kMax>(start);
    } else {
      dispatch_count<kMax - 1>(n, start, f);
    }
  }
}

// Whole tiles of R rows over [0, count), then the rest in one shorter tile.
template <int R, typename Tile>
void each_tile(int64_t count, Tile&& tile) {
  int64_t start = 0;
  for (; start + R <= count; start += R) tile.template operator()<R>(start);
  dispatch_count<R - 1>(count - start, start, tile);
}

// The rows of one panel of V vectors: whole tiles of 24 / V rows (streamed when `stream`), then the rest in one
// short tile with plain stores (its lines are few). kImages: the bias is one value per row, so the short tile's
// starts `full` rows on.
template <bool kImages, int V, typename T>
void panel_rows(int64_t rows, const T* a, int64_t lda, const T* panel, int64_t ldb, int64_t depth, const float* bias,
                T* c, int64_t ldc, const __mmask16* masks, bool stream) {
  constexpr int kRows = kTileAcc / V;
  const int64_t full = rows / kRows;
  if (stream) {
    tiles<kRows, V, true, kImages>(full, a, lda, panel, ldb, depth, bias, c, ldc, masks);
  } else {
    tiles<kRows, V, false, kImages>(full, a, lda, panel, ldb, depth, bias, c, ldc, masks);
  }
  const float* rest_bias = kImages && bias ? bias + full * kRows : bias;
  dispatch_count<kRows - 1>(rows - full * kRows, 0, [&]<int R>(int64_t) {
    tiles<R, V, false, kImages>(1, a + full * kRows * lda, lda, panel, ldb, depth, rest_bias, c + full * kRows * ldc,
                                ldc, masks);
  });
}

// f(k0, depth, p, masks, stream_ok) for each reduction block [k0, k0 + depth) of `total`, `block` deep, and each
// panel p in [p0, p1) of a `width`-column output cut into panels `panel` columns wide; stream_ok: the last block
// of a full panel.
template <typename F>
void blocks_and_panels(int64_t total, int64_t block, int64_t width, int64_t panel, int64_t p0, int64_t p1, F&& f) {
  for (int64_t k0 = 0, depth; k0 < total; k0 += depth) {
    depth = std::min(block, total - k0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(panel, width - p * panel);
      __mmask16 masks[4];
      panel_masks(cols, masks);
      f(k0, depth, p, masks, k0 + depth == total && cols == panel);
    }
  }
}

// The bias as `size` fp32 values (zeros past it, and all zeros without one), whatever its dtype and stride.
std::vector<float> bias_values(const std::optional<at::Tensor>& bias, int64_t size) {
  std::vector<float> values(size, 0.f);
  if (bias) {
    const at::Tensor b = bias->to(at::kFloat);
    for (int64_t j = 0; j < b.size(0); ++j) values[j] = b.const_data_ptr<float>()[j * b.stride(0)];
  }
  return values;
}

template <typename T>
struct Problem {
  const T* x;
  int64_t ldx;
  const T* packed;     // w^T in panels of 16V columns: panel p holds rows k of columns [16Vp, 16V(p + 1)), zero-padded
  const float* bias;   // padded to whole panels, zeros without a bias
  T* out;
  int64_t ldo, k, n;
  bool stream;
};

// Rows [m0, m1) x panels [p0, p1) of out, reduction block by block.
template <typename T, int V>
void run_task(const Problem<T>& pr, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  constexpr int64_t width = 16 * V;
  blocks_and_panels(pr.k, Layout<T>::kDepth, pr.n, width, p0, p1, [&](int64_t k0, int64_t depth, int64_t p, const __mmask16* masks, bool full) {
    panel_rows<false, V>(m1 - m0, pr.x + m0 * pr.ldx + k0, pr.ldx, pr.packed + p * pr.k * width + k0 * width, width,
                         depth, k0 == 0 ? pr.bias + p * width : nullptr, pr.out + m0 * pr.ldo + p * width, pr.ldo, masks,
                         pr.stream && full);
  });
}

// Vectors per panel of linear_out for n output columns: one (tiles of 24 x 1 accumulators) for at most 16, two
// (12 x 2) for at most 32; above that four (6 x 4), two or three (8 x 3), whichever pads the last panel least, in
// that order on a tie (96 and 160 take two, 48 and 144 three). A 64-column panel on 16 or 32 outputs would be three
// quarters or half padding. One-off in-process A/Bs of the widths (2 threads, fp32 and bf16, nine layers with 40-192
// outputs): the least padding was the fastest or within 5% of it, except 16->96, where two read 1.02-1.08x
// torch's convolution in bf16 and three 0.98-1.02x; one vector on 48-144 outputs lost up to 0.43x.
int linear_vectors(int64_t n) {
  if (n <= 16) return 1;
  if (n <= 32) return 2;
  int best = 4;
  for (const int v : {2, 3}) {
    if (round_up(n, 16 * v) < round_up(n, 16 * best)) best = v;
  }
  return best;
}

// Packs w (N, K), any strides, into panels of w^T 16V columns wide and runs the tiles over all threads.
template <typename T, int V>
void run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& out,
         int64_t stream_min_bytes) {
  constexpr int64_t pack = Layout<T>::kPack, width = 16 * V;
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const int64_t panels = (n + width - 1) / width;
  at::Tensor packed = at::empty({panels * k * width}, w.options());
  T* pk = static_cast<T*>(packed.data_ptr());
  const T* wp = static_cast<const T*>(w.const_data_ptr());
  const int64_t ws0 = w.stride(0), ws1 = w.stride(1);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* dst = pk + p * k * width;
      const int64_t cols = std::min(width, n - p * width);
      for (int64_t j = 0; j < width; ++j) {  // element (i, j) of the panel at step i / pack, lane j, slot i % pack
        const T* src = wp + (p * width + j) * ws0;
        for (int64_t i = 0; i < k; ++i) dst[(i - i % pack) * width + j * pack + i % pack] = j < cols ? src[i * ws1] : T(0);
      }
    }
  });
  std::vector<float> padded_bias = bias_values(bias, panels * width);
  T* o = static_cast<T*>(out.data_ptr());
  const int64_t ldo = out.stride(0);
  // Non-temporal stores need aligned rows: an output at a 64-byte address whose rows are whole cache lines.
  const bool aligned = reinterpret_cast<uintptr_t>(o) % 64 == 0 && (ldo * sizeof(T)) % 64 == 0;
  const Problem<T> pr{static_cast<const T*>(x.const_data_ptr()), x.stride(0), pk, padded_bias.data(), o, ldo, k, n,
                      aligned && m * n * static_cast<int64_t>(sizeof(T)) >= stream_min_bytes};
  const int64_t row_tasks = (m + kTaskRows - 1) / kTaskRows, panel_tasks = (panels + kTaskPanels - 1) / kTaskPanels;
  at::parallel_for(0, row_tasks * panel_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rt = t / panel_tasks, pt = t % panel_tasks;
      run_task<T, V>(pr, rt * kTaskRows, std::min(m, (rt + 1) * kTaskRows), pt * kTaskPanels,
                     std::min(panels, (pt + 1) * kTaskPanels));
    }
    _mm_sfence();  // this thread's non-temporal stores are visible before the caller reads out
  });
}

// out[n] = w @ x[n] + bias[:, None] for every image of x (N, C, P), fp32: the NCHW form of a 1x1 convolution,
// the P pixels of an image its columns. The panels are the images' own rows, read in place (each channel's
// pixels lie contiguous, so no packing), the broadcast operand is w (K, C), and each tile row starts at its
// output channel's bias.
struct Images {
  const float* w;
  int64_t ldw;
  const float* x;
  int64_t xs0, xs1;   // image and channel strides of x
  const float* bias;  // K values, zeros without a bias
  float* out;
  int64_t os0, os1, c, k, p;
  bool stream;
};

// Rows [r0, r1) x panels [q0, q1) of image n's output, reduction block by block. A panel is `depth` channel
// rows of 64 pixels, each row in another part of the image: the walk down them stalls on memory unless the
// next panel is fetched ahead, which the first tile of each panel does (one-off: dX of 32->512 @56, a
// 512-deep reduction, ran 0.51x the native matmul without it, 1.08-1.10x with it).
void images_task(const Images& pr, int64_t n, int64_t r0, int64_t r1, int64_t q0, int64_t q1) {
  blocks_and_panels(pr.c, Layout<float>::kDepth, pr.p, kPanel, q0, q1, [&](int64_t c0, int64_t depth, int64_t q, const __mmask16* masks, bool full) {
    panel_rows<true, 4>(r1 - r0, pr.w + r0 * pr.ldw + c0, pr.ldw, pr.x + n * pr.xs0 + c0 * pr.xs1 + q * kPanel, pr.xs1,
                     depth, c0 == 0 ? pr.bias + r0 : nullptr, pr.out + n * pr.os0 + r0 * pr.os1 + q * kPanel, pr.os1,
                     masks, pr.stream && full);
  });
}

void run_images(const at::Tensor& w, const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& out,
                int64_t stream_min_bytes) {
  const int64_t n = x.size(0), c = x.size(1), p = x.size(2), k = w.size(0);
  std::vector<float> row_bias = bias_values(bias, k);
  float* o = out.data_ptr<float>();
  // Non-temporal stores need every row of every image on whole cache lines.
  const bool aligned = reinterpret_cast<uintptr_t>(o) % 64 == 0 && (out.stride(1) * 4) % 64 == 0 &&
                       (out.stride(0) * 4) % 64 == 0;
  const Images pr{w.const_data_ptr<float>(), w.stride(0), x.const_data_ptr<float>(), x.stride(0), x.stride(1),
                  row_bias.data(), o, out.stride(0), out.stride(1), c, k, p,
                  aligned && n * k * p * static_cast<int64_t>(sizeof(float)) >= stream_min_bytes};
  const int64_t panels = (p + kPanel - 1) / kPanel;
  const int64_t row_tasks = (k + kTaskRows - 1) / kTaskRows, panel_tasks = (panels + kTaskPanels - 1) / kTaskPanels;
  // Consecutive tasks share an image's panels (row tasks innermost), so a thread's run of them reuses its panels.
  at::parallel_for(0, n * panel_tasks * row_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / (panel_tasks * row_tasks), pt = t / row_tasks % panel_tasks, rt = t % row_tasks;
      images_task(pr, image, rt * kTaskRows, std::min(k, (rt + 1) * kTaskRows), pt * kTaskPanels,
                  std::min(panels, (pt + 1) * kTaskPanels));
    }
    _mm_sfence();
  });
}

// dwt = the sum of the `threads` partial dW^T (c_k values each) and db = that of their partial db (the k values after
// each), in parallel over the elements.
void sum_partials(const std::vector<float>& parts, int threads, int64_t c_k, const at::Tensor& dwt,
                  const std::optional<at::Tensor>& db) {
  const int64_t k = db ? db->size(0) : 0, stride = static_cast<int64_t>(parts.size()) / threads;
  float* out = dwt.data_ptr<float>();
  float* out_db = db ? db->data_ptr<float>() : nullptr;
  at::parallel_for(0, c_k + k, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float sum = 0.f;
      for (int t = 0; t < threads; ++t) sum += parts[t * stride + i];
      if (i < c_k) {
        out[i] = sum;
      } else {
        out_db[i - c_k] = sum;
      }
    }
  });
}

// rows_backward: dW^T = x^T @ grad, db = sum of grad's rows and dX = grad @ w, fp32: the three gradients of a
// channels_last 1x1 convolution, x (M, C) and grad (M, K), in one pass over grad (dX per block, below). A tile
// of dW^T is R input channels x V 16-lane vectors of output channels, 24 accumulators (8 x 3 or 6 x 4, whichever
// pads K less; 24 x 1 with K <= 16, 12 x 2 for fp32 with K <= 32, see grad_panel_cols); for each row m it
// broadcasts x[m, c] and multiplies grad[m, panel], the vectors the bias gradient sums too. Each thread reduces
// its blocks of rows into its own partial sums, added up at the end; the tile of channel 0 prefetches the next
// block's rows into L2, which the strided walk down grad's rows otherwise waits on (it doubled the speed on
// 32-channel layers): its panel of grad's, and in the first panel all of x's lines. x's rows, read a few channels
// at a time by each tile, had waited on memory once they left the cache: with their prefetch, one-off A/Bs, old and
// new library alternating in processes (2 threads, /tmp, not kept), the kernel alone 0.99-1.19x on 18 layers
// (144->32 @56 1.19x, 32->512 @56 1.13x, 256->64 @56 1.11x), the whole layer timed in rotation with torch's as the
// benchmark does 0.93-1.14x on 9 (32->256 @56 3.94 -> 3.77 ms; the 0.93x, 144->32 @28, read 1.00x in a second run).
constexpr int64_t kGradBlock = 128;  // rows of grad a thread reduces before the next panel (kept in L1)

template <int R, int V, bool kSum, bool kPrefetch>
__attribute__((target("avx512f"))) void grad_tile(int64_t rows, const float* x, int64_t ldx, const float* g,
                                                   int64_t ldg, float* acc_out, int64_t ld_acc, float* db,
                                                   const __mmask16* masks, int64_t ahead, int64_t x_ahead = 0,
                                                   int64_t x_lines = 0) {
  __m512 acc[R][V], sums[1][V];  // sums: db's slice of this panel, one tile row
  zero_tile<R, V>(acc);
  zero_tile<1, V>(sums);
  for (int64_t m = 0; m < rows; ++m) {
    const float* gp = g + m * ldg;
    if constexpr (kPrefetch) {
      const char* next_x = reinterpret_cast<const char*>(x + m * ldx + x_ahead);
      for (int64_t l = 0; l < x_lines; ++l) _mm_prefetch(next_x + 64 * l, _MM_HINT_T1);
    }
    __m512 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if constexpr (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(gp + ahead + 16 * v), _MM_HINT_T1);
      b[v] = _mm512_maskz_loadu_ps(masks[v], gp + 16 * v);
      if constexpr (kSum) sums[0][v] = _mm512_add_ps(sums[0][v], b[v]);
    }
    rank1<R, V>(acc, x + m * ldx, 1, b);
  }
  add_tile<R, V>(acc, acc_out, ld_acc, masks);
  if constexpr (kSum) add_tile<1, V>(sums, db, 0, masks);
}

// Tiles of R input channels from channel c0: the one of channel 0 also sums the bias gradient (db given) and
// prefetches the next block's rows (`ahead` elements on; 0: no next block).
template <int R, int V>
void grad_tiles(int64_t rows, const float* x, int64_t ldx, const float* g, int64_t ldg, float* part, int64_t k,
                float* db, const __mmask16* masks, int64_t c0, int64_t ahead, int64_t x_ahead, int64_t x_lines) {
  x += c0, part += c0 * k;
  if (c0 == 0 && ahead) {
    if (db) {
      grad_tile<R, V, true, true>(rows, x, ldx, g, ldg, part, k, db, masks, ahead, x_ahead, x_lines);
    } else {
      grad_tile<R, V, false, true>(rows, x, ldx, g, ldg, part, k, nullptr, masks, ahead, x_ahead, x_lines);
    }
  } else if (db && c0 == 0) {
    grad_tile<R, V, true, false>(rows, x, ldx, g, ldg, part, k, db, masks, 0);
  } else {
    grad_tile<R, V, false, false>(rows, x, ldx, g, ldg, part, k, nullptr, masks, 0);
  }
}

// All C input channels of one panel of V vectors: whole tiles of R = 24 / V channels, then the rest.
template <int V>
void grad_panel(int64_t rows, const float* x, int64_t ldx, const float* g, int64_t ldg, float* part, int64_t c,
                int64_t k, float* db, const __mmask16* masks, int64_t ahead, int64_t x_ahead = 0,
                int64_t x_lines = 0) {
  each_tile<24 / V>(c, [&]<int R>(int64_t c0) {
    grad_tiles<R, V>(rows, x, ldx, g, ldg, part, k, db, masks, c0, ahead, x_ahead, x_lines);
  });
}

// dX rows = grad rows @ w, for the rows of a block whose grad is still in cache: R rows x V vectors of dX's C
// columns (24 accumulators), w (K, C) read in place, its rows being the panel's rows.
// kSum (images_backward, where w's rows are dY's channel rows): also lanes[16j, 16j + 16) += the sum of row j's
// vectors, the bias gradient of those pixels before its lanes are added up.
template <int R, int V, bool kSum = false>
__attribute__((target("avx512f"))) void dx_tile(const float* g, int64_t ldg, const float* w, int64_t ldw, int64_t k,
                                                 float* dx, int64_t lddx, const __mmask16* masks, float* lanes = nullptr) {
  __m512 acc[R][V];
  zero_tile<R, V>(acc);
  for (int64_t j = 0; j < k; ++j) {
    __m512 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = _mm512_maskz_loadu_ps(masks[v], w + j * ldw + 16 * v);
    if constexpr (kSum) {
      __m512 sum = _mm512_loadu_ps(lanes + 16 * j);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) sum = _mm512_add_ps(sum, b[v]);
      _mm512_storeu_ps(lanes + 16 * j, sum);
    }
    rank1<R, V>(acc, g + j, ldg, b);
  }
  store_tile<R, V>(acc, dx, lddx, masks);
}

// dX rows in bf16: acc[r][v] += (g[r, j], g[r, j + 1]) . w pairs (rows j, j + 1; columns 16v ..), rounded once.
template <int R, int V>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dx_tile(const bf16_bits* g, int64_t ldg,
                                                                            const pair_bits* wp, int64_t ldwp, int64_t k,
                                                                            bf16_bits* dx, int64_t lddx,
                                                                            const __mmask16* masks) {
  __m512 acc[R][V];
  zero_tile<R, V>(acc);
  for (int64_t j = 0; j < k; j += 2) {
    __m512bh b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(wp + (j / 2) * ldwp + 16 * v);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, g + r * ldg + j, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      _mm256_mask_storeu_epi16(dx + r * lddx + 16 * v, masks[v], (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
    }
  }
}

// dX for `rows` rows: panels of 16V columns, tiles of 24 / V rows (fp32: w as it lies; bf16: w in row pairs).
// `lanes` (fp32, images_backward): the first tile of each panel also sums w's rows into them (see dx_tile).
template <int V, typename T, typename W>
void dx_rows(int64_t rows, const T* g, int64_t ldg, const W* w, int64_t ldw, int64_t c, int64_t k, T* dx,
             int64_t lddx, float* lanes = nullptr) {
  constexpr int R = 24 / V;
  for (int64_t c0 = 0; c0 < c; c0 += 16 * V) {
    __mmask16 masks[4];
    panel_masks(std::min<int64_t>(16 * V, c - c0), masks);
    each_tile<R>(rows, [&]<int kRows>(int64_t r0) {
      if constexpr (std::is_same_v<T, float>) {
        if (lanes && r0 == 0) {
          dx_tile<kRows, V, true>(g, ldg, w + c0, ldw, k, dx + c0, lddx, masks, lanes);
          return;
        }
      }
      dx_tile<kRows, V>(g + r0 * ldg, ldg, w + c0, ldw, k, dx + r0 * lddx + c0, lddx, masks);
    });
  }
}

// Panels of 48 or 64 of grad's K columns, whichever leaves fewer empty lanes in the last one (64 on a tie); up to 16
// columns one panel of 16 (24 x 1 tiles; one-off, five 16-output layers against torch's backward in two runs, before
// and after: fp32 0.97-1.33x, bf16 1.08-1.25x the 32- and 48-column panels); fp32 takes up to 32 columns in one panel of 32 (12 x 2 tiles; one-off, 1.2-1.4x on four layers
// with 16-32 outputs, where 48 left a third of each tile empty; bf16, whose cost there is the pairing, read 0.9-1.0x).
int64_t grad_panel_cols(int64_t k, bool narrow) {
  if (k <= 16) return 16;
  if (narrow && k <= 32) return 32;
  return round_up(k, 48) < round_up(k, 64) ? 48 : 64;
}

// A panel over `cols` columns: as few 16-column vectors as cover them, at most four.
int64_t vector_count(int64_t cols) { return std::min<int64_t>(4, (cols + 15) / 16); }

// f(chunk, begin, end) for one chunk of consecutive blocks [begin, end) per thread, in parallel. Each chunk
// reduces into its own partial sums, indexed by chunk, not by the thread that runs it, so a call from inside
// another parallel region stays correct.
template <typename F>
void block_chunks(int64_t blocks, int threads, F&& f) {
  const int64_t per_chunk = (blocks + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      f(chunk, chunk * per_chunk, std::min(blocks, (chunk + 1) * per_chunk));
    }
  });
}

void run_weight_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dwt,
                     const std::optional<at::Tensor>& db, const std::optional<at::Tensor>& w,
                     const std::optional<at::Tensor>& dx) {
  const int64_t m = grad.size(0), k = grad.size(1), c = x.size(1);
  const int64_t ldg = grad.stride(0), ldx = x.stride(0);
  const float* gp = grad.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const int threads = at::get_num_threads();
  const int64_t stride = c * k + k;  // one thread's partial dW^T, then its partial db
  std::vector<float> parts(threads * stride, 0.f);
  const int64_t blocks = (m + kGradBlock - 1) / kGradBlock;
  const int64_t cols = grad_panel_cols(k, true);
  const float* wp = w ? w->const_data_ptr<float>() : nullptr;
  float* dxp = dx ? dx->data_ptr<float>() : nullptr;
  const int64_t ldw = w ? w->stride(0) : 0, lddx = dx ? dx->stride(0) : 0;
  block_chunks(blocks, threads, [&](int64_t chunk, int64_t begin, int64_t end) {
    float* part = parts.data() + chunk * stride;
    float* part_db = db ? part + c * k : nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t m0 = b * kGradBlock, rows = std::min(kGradBlock, m - m0);
      const int64_t ahead = b + 1 < end ? kGradBlock * ldg : 0, x_ahead = b + 1 < end ? kGradBlock * ldx : 0;
      for (int64_t k0 = 0; k0 < k; k0 += cols) {
        __mmask16 masks[4];
        panel_masks(std::min(cols, k - k0), masks);
        const float* g = gp + m0 * ldg + k0;
        const float* xr = xp + m0 * ldx;
        float* dbk = part_db ? part_db + k0 : nullptr;
        dispatch_count<4>(cols / 16, 0, [&]<int V>(int64_t) {
          const int64_t x_lines = k0 == 0 ? (c + 15) / 16 : 0;  // x's next rows once, with the first panel
          grad_panel<V>(rows, xr, ldx, g, ldg, part + k0, c, k, dbk, masks, ahead, x_ahead, x_lines);
        });
      }
      if (dxp) {  // this block's grad rows are in cache now: their dX too
        dispatch_count<4>(vector_count(c), 0, [&]<int V>(int64_t) {
          dx_rows<V>(rows, gp + m0 * ldg, ldg, wp, ldw, c, k, dxp + m0 * lddx, lddx);
        });
      }
    }
  });
  sum_partials(parts, threads, c * k, dwt, db);
}

// rows_backward in bf16: the same pass, multiplying pairs with AVX512_BF16's dot product and summing in fp32. dW
// reduces over rows, so each block's grad and x rows are first interleaved in pairs of rows, (g[2i, k],
// g[2i + 1, k]) side by side (a last odd row paired with zero); db is the dot product of those pairs with (1, 1).
// Up to kWidenMaxOut outputs, dW instead widens each block's rows to fp32 and runs fp32's tiles on them (below).
// dX reduces over grad's columns, already adjacent in a row; w is packed once into pairs of its rows.
constexpr int64_t kPairBlock = kGradBlock / 2;

// bf16 dW with at most this many outputs (one 16-column panel) widens the block's grad and x rows to fp32 and
// runs the fp32 tiles (24 x 1): with 16 outputs each row feeds few multiply-adds, so interleaving rows in pairs
// cost about as much as the products, and widening (a shift) costs less. One-off A/B of the kernel, old and new
// library alternating in three processes each (2 threads, /tmp, not kept): dW 1.04-1.25x on 16, 48 and 64 inputs
// with 16 outputs and on 24->8 and 64->12, all three gradients 1.03-1.17x; a tie on 32 inputs (32->16 at 100352
// and 131072 rows: dW 0.97-0.99x, all three 0.94-1.00x), which stays at 0.8x torch's backward in bf16.
constexpr int64_t kWidenMaxOut = 16;

// Rows of src (`rows` x `cols` bf16, row stride ld) as fp32 into dst (row stride cols): a bf16 is the high half
// of the fp32 with the same bits, so widening is a shift.
__attribute__((target("avx512f,avx512bw"))) void widen_rows(const bf16_bits* src, int64_t ld, int64_t rows,
                                                            int64_t cols, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t left = std::min<int64_t>(cols - j, 16);
      const __mmask16 mask = left == 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __m256i half = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(__mmask32(mask), src + r * ld + j));
      const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
      _mm512_mask_storeu_ps(dst + r * cols + j, mask, _mm512_castsi512_ps(wide));
    }
  }
}

// Pairs of rows r0 = 2i and 2i + 1 of src (`rows` rows, `cols` columns, row stride ld) into dst[i, j], cols_pad
// wide (zeros past cols). `ahead` (elements; 0: none): each line read also fetches the line that far on into L2.
// rows_backward fetches x's next block so (one-off A/B, old and new library alternating in processes, 2 threads,
// /tmp, not kept: dW alone 1.05-1.40x at 401408 rows, out of the cache, 0.92-1.04x on rows still in it; the whole
// layer in rotation with torch's 0.94-1.09x on 9 layers, 1.03-1.04x on most); grad's next block too read mixed.
__attribute__((target("avx512f,avx512bw"))) void pack_row_pairs(const bf16_bits* src, int64_t ld, int64_t rows,
                                                                int64_t cols, int64_t cols_pad, pair_bits* dst,
                                                                int64_t ahead = 0) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t i = 0; 2 * i < rows; ++i) {
    const bf16_bits* a = src + 2 * i * ld;
    const bf16_bits* b = 2 * i + 1 < rows ? a + ld : nullptr;
    pair_bits* d = dst + i * cols_pad;
    for (int64_t j = 0; j < cols_pad; j += 32) {
      const int64_t left = std::clamp<int64_t>(cols - j, 0, 32);
      if (ahead && left) {
        _mm_prefetch(reinterpret_cast<const char*>(a + j + ahead), _MM_HINT_T1);
        if (b) _mm_prefetch(reinterpret_cast<const char*>(b + j + ahead), _MM_HINT_T1);
      }
      const __mmask32 mask = left == 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      const __m512i va = _mm512_maskz_loadu_epi16(mask, a + j);
      const __m512i vb = b ? _mm512_maskz_loadu_epi16(mask, b + j) : _mm512_setzero_si512();
      _mm512_storeu_si512(d + j, _mm512_permutex2var_epi16(va, lo, vb));  // pairs of columns j .. j + 15
      if (j + 16 < cols_pad) _mm512_storeu_si512(d + j + 16, _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
}

// dW^T tile in bf16: acc[r][v] += x pair (rows 2i, 2i + 1; channel c0 + r) . grad pairs (columns 16v ..), over the
// block's `pairs` row pairs; with kSum also db += (1, 1) . grad pairs.
template <int R, int V, bool kSum>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void grad_tile_bf16(int64_t pairs, const pair_bits* xp,
                                                                          int64_t ldxp, const pair_bits* gp,
                                                                          int64_t ldgp, float* acc_out, int64_t ld_acc,
                                                                          float* db, const __mmask16* masks) {
  __m512 acc[R][V], sums[1][V];  // sums: db's slice of this panel, one tile row
  zero_tile<R, V>(acc);
  zero_tile<1, V>(sums);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      b[v] = (__m512bh)_mm512_loadu_si512(gp + i * ldgp + 16 * v);
      if constexpr (kSum) sums[0][v] = _mm512_dpbf16_ps(sums[0][v], ones, b[v]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xp[i * ldxp + r]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  add_tile<R, V>(acc, acc_out, ld_acc, masks);
  if constexpr (kSum) add_tile<1, V>(sums, db, 0, masks);
}

template <int R, int V>
void grad_tiles_bf16(int64_t pairs, const pair_bits* xp, int64_t ldxp, const pair_bits* gp, int64_t ldgp, float* part,
                     int64_t k, float* db, const __mmask16* masks, int64_t c0) {
  if (db && c0 == 0) {
    grad_tile_bf16<R, V, true>(pairs, xp + c0, ldxp, gp, ldgp, part + c0 * k, k, db, masks);
  } else {
    grad_tile_bf16<R, V, false>(pairs, xp + c0, ldxp, gp, ldgp, part + c0 * k, k, nullptr, masks);
  }
}

template <int V>
void grad_panel_bf16(int64_t pairs, const pair_bits* xp, int64_t ldxp, const pair_bits* gp, int64_t ldgp, float* part,
                     int64_t c, int64_t k, float* db, const __mmask16* masks) {
  each_tile<24 / V>(c, [&]<int R>(int64_t c0) { grad_tiles_bf16<R, V>(pairs, xp, ldxp, gp, ldgp, part, k, db, masks, c0); });
}

void run_backward_bf16(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dwt,
                       const std::optional<at::Tensor>& db, const std::optional<at::Tensor>& w,
                       const std::optional<at::Tensor>& dx) {
  const int64_t m = grad.size(0), k = grad.size(1), c = x.size(1);
  const int64_t ldg = grad.stride(0), ldx = x.stride(0);
  const auto* gp = static_cast<const bf16_bits*>(grad.const_data_ptr());
  const auto* xp = static_cast<const bf16_bits*>(x.const_data_ptr());
  const int threads = at::get_num_threads();
  const int64_t stride = c * k + k;
  std::vector<float> parts(threads * stride, 0.f);
  const int64_t blocks = (m + kGradBlock - 1) / kGradBlock;
  const int64_t cols = grad_panel_cols(k, false), dx_vectors = vector_count(c);
  const int64_t k_pad = round_up(k, cols), c_pad = round_up(c, 32);
  // w (K, C) in pairs of rows, once: dX's panels, padded to whole panels of dx_vectors vectors.
  const int64_t c_pad16 = round_up(c, 16 * dx_vectors);
  std::vector<pair_bits> w_pairs;
  if (w) {
    w_pairs.assign((k + 1) / 2 * c_pad16, 0);
    pack_row_pairs(static_cast<const bf16_bits*>(w->const_data_ptr()), w->stride(0), k, c, c_pad16, w_pairs.data());
  }
  auto* dxp = dx ? static_cast<bf16_bits*>(dx->data_ptr()) : nullptr;
  const int64_t lddx = dx ? dx->stride(0) : 0;
  const bool widen = k <= kWidenMaxOut;
  block_chunks(blocks, threads, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<pair_bits> g_pairs(widen ? 0 : kPairBlock * k_pad), x_pairs(widen ? 0 : kPairBlock * c_pad);
    std::vector<float> g_wide(widen ? kGradBlock * k : 0), x_wide(widen ? kGradBlock * c : 0);
    float* part = parts.data() + chunk * stride;
    float* part_db = db ? part + c * k : nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t m0 = b * kGradBlock, rows = std::min(kGradBlock, m - m0);
      if (widen) {  // one 16-column panel: fp32 tiles on the widened rows
        widen_rows(gp + m0 * ldg, ldg, rows, k, g_wide.data());
        widen_rows(xp + m0 * ldx, ldx, rows, c, x_wide.data());
        __mmask16 masks[4];
        panel_masks(k, masks);
        grad_panel<1>(rows, x_wide.data(), c, g_wide.data(), k, part, c, k, part_db, masks, 0);
      } else {
        pack_row_pairs(gp + m0 * ldg, ldg, rows, k, k_pad, g_pairs.data());
        pack_row_pairs(xp + m0 * ldx, ldx, rows, c, c_pad, x_pairs.data(), b + 1 < end ? kGradBlock * ldx : 0);
        const int64_t pairs = (rows + 1) / 2;
        for (int64_t k0 = 0; k0 < k; k0 += cols) {
          __mmask16 masks[4];
          panel_masks(std::min(cols, k - k0), masks);
          float* dbk = part_db ? part_db + k0 : nullptr;
          dispatch_count<4>(cols / 16, 0, [&]<int V>(int64_t) {
            grad_panel_bf16<V>(pairs, x_pairs.data(), c_pad, g_pairs.data() + k0, k_pad, part + k0, c, k, dbk, masks);
          });
        }
      }
      if (dxp) {
        dispatch_count<4>(dx_vectors, 0, [&]<int V>(int64_t) {
          dx_rows<V>(rows, gp + m0 * ldg, ldg, w_pairs.data(), c_pad16, c, k, dxp + m0 * lddx, lddx);
        });
      }
    }
  });
  sum_partials(parts, threads, c * k, dwt, db);
}

// images_backward: dW = sum_n dY[n] @ x[n]^T, db = the sums of dY's channel rows and dX[n] = W^T @ dY[n], fp32:
// the three gradients of an NCHW 1x1 convolution, dY (N, K, P) and x (N, C, P), in one pass over dY. The work
// is chunks of kImagesChunk pixels of one image, each thread a run of them, summed into its own partial dW and
// db. Per chunk:
//   * x's (C, chunk) slice is transposed into pixel rows (16 x 16 blocks in registers);
//   * dW: a tile is R output channels x V vectors of input channels (24 accumulators), broadcasting dY[k, p]
//     from the channel rows as they lie and multiplying x^T's row p. The tiles fetch the next chunk's rows of
//     dY ahead, one line a step: a walk down K channel rows an image apart (12.5 KiB at 56x56) is nothing the
//     hardware prefetcher follows;
//   * dX: wt @ the chunk, 8 input channels x 48 pixels a tile (dx_rows<3>, dY's rows the vectors), while the chunk
//     is in L2. The first tile also sums each row's vectors into 16 lanes of db, added up at the end (a pass of
//     its own over the chunk, as row_sums does when no dX is asked for, added 5-17% to dW's time, one-off).
// 240 pixels: five of dX's panels; the chunk's K rows and the next chunk's, about 1 MiB at K = 512, fit this
// host's L2 (1 MiB a core) up to about there.
constexpr int64_t kImagesChunk = 240;

// The tiles fetch the next chunk's x too, for at most this many input channels and where an image spans chunks.
// One-off A/B of the kernel, old and new library alternating in processes (2 threads, /tmp, not kept): 0.99-1.21x
// on 7 layers with 16-128 inputs from 28x28 to 112x112 (32->64 @112 2.60 -> 2.15 ms); with 256 inputs (28x28,
// 56x56) a tie, 0.97-1.02x: their chunk and its x^T already fill much of L2. A smaller image's (C, P) block is one run of memory,
// which the hardware prefetcher follows into the next image.
constexpr int64_t kImagesPrefetchMaxIn = 128;

// The 16 x 16 transpose of rows r[0..15] in registers: within each 128-bit lane four 4 x 4 transposes (unpacks),
// then the lanes regrouped across registers (two rounds of shuffle_f32x4). Row 4L + m of the result is column
// 4L + m of the input.
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // (a0 b0 a1 b1) per lane
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);  // (a2 b2 a3 b3)
  }
  __m512 s[4][4];  // s[a][m], lane L: rows 4a .. 4a + 3 at column 4L + m
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    const __m512d lo0 = _mm512_castps_pd(t[4 * a]), hi0 = _mm512_castps_pd(t[4 * a + 2]);
    const __m512d lo1 = _mm512_castps_pd(t[4 * a + 1]), hi1 = _mm512_castps_pd(t[4 * a + 3]);
    s[a][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, hi0));
    s[a][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, hi0));
    s[a][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo1, hi1));
    s[a][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo1, hi1));
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    const __m512 even01 = _mm512_shuffle_f32x4(s[0][m], s[1][m], 0x88), odd01 = _mm512_shuffle_f32x4(s[0][m], s[1][m], 0xDD);
    const __m512 even23 = _mm512_shuffle_f32x4(s[2][m], s[3][m], 0x88), odd23 = _mm512_shuffle_f32x4(s[2][m], s[3][m], 0xDD);
    r[m] = _mm512_shuffle_f32x4(even01, even23, 0x88);       // lane 0 of each
    r[8 + m] = _mm512_shuffle_f32x4(even01, even23, 0xDD);   // lane 2
    r[4 + m] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);     // lane 1
    r[12 + m] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);    // lane 3
  }
}

// xt[i, j] = x[j, i] for `cols` pixels i and `c` channels j (rows ldx apart); xt's rows are ldt wide, a whole
// number of vectors, zero past c. kPrefetch: each load also fetches the same line of `next`, the next chunk's x, into
// L2 (its rows lie an image's pixels apart, a walk the hardware prefetcher does not follow either).
template <bool kPrefetch>
__attribute__((target("avx512f"))) void transpose_chunk(const float* x, int64_t ldx, int64_t c, int64_t cols,
                                                        float* xt, int64_t ldt, const float* next) {
  for (int64_t j0 = 0; j0 < ldt; j0 += 16) {
    for (int64_t i0 = 0; i0 < cols; i0 += 16) {
      const int64_t left = std::min<int64_t>(16, cols - i0);
      const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
      __m512 r[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if constexpr (kPrefetch) {
          if (j0 + j < c) _mm_prefetch(reinterpret_cast<const char*>(next + (j0 + j) * ldx + i0), _MM_HINT_T1);
        }
        r[j] = j0 + j < c ? _mm512_maskz_loadu_ps(mask, x + (j0 + j) * ldx + i0) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t i = 0; i < left; ++i) _mm512_storeu_ps(xt + (i0 + i) * ldt + j0, r[i]);
    }
  }
}

// dw[0:R, 0:16V) (rows lddw apart, columns masked) += sum over the chunk's `cols` pixels p of dY[r, p] * xt[p, :].
// `next`: the same R rows of the next chunk, fetched into L2 one line a step (0: no next chunk).
template <int R, int V>
__attribute__((target("avx512f"))) void images_grad_tile(int64_t cols, const float* g, int64_t ldg, const float* xt,
                                                          int64_t ldt, float* dw, int64_t lddw, const __mmask16* masks,
                                                          const float* next) {
  __m512 acc[R][V];
  zero_tile<R, V>(acc);
  constexpr int64_t kLines = kImagesChunk / 16;  // cache lines of one row of a chunk
  for (int64_t i = 0; i < cols; ++i) {
    if (next && i < R * kLines) _mm_prefetch(reinterpret_cast<const char*>(next + i / kLines * ldg + 16 * (i % kLines)), _MM_HINT_T1);
    __m512 b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(xt + i * ldt + 16 * v);
    rank1<R, V>(acc, g + i, ldg, b);
  }
  add_tile<R, V>(acc, dw, lddw, masks);
}

// db[r] += the sum of row r's `cols` values, for `rows` rows ldg apart (the bias gradient without dX's pass).
__attribute__((target("avx512f"))) void row_sums(int64_t rows, int64_t cols, const float* g, int64_t ldg, float* db) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < cols; i += 16) {
      const int64_t left = std::min<int64_t>(16, cols - i);
      sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1u), g + r * ldg + i));
    }
    db[r] += _mm512_reduce_add_ps(sum);
  }
}

// out[r] = the sum of sums[r]'s 16 lanes.
__attribute__((target("avx512f"))) void lane_sums(int64_t rows, const float* sums, float* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = _mm512_reduce_add_ps(_mm512_loadu_ps(sums + 16 * r));
}

void run_images_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dw,
                         const std::optional<at::Tensor>& db, const std::optional<at::Tensor>& wt,
                         const std::optional<at::Tensor>& dx) {
  const int64_t n = grad.size(0), k = grad.size(1), p = grad.size(2), c = x.size(1);
  const int64_t gs0 = grad.stride(0), ldg = grad.stride(1), xs0 = x.stride(0), ldx = x.stride(1);
  const float* gp = grad.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* wtp = wt ? wt->const_data_ptr<float>() : nullptr;
  float* dxp = dx ? dx->data_ptr<float>() : nullptr;
  const int64_t ldwt = wt ? wt->stride(0) : 0, ds0 = dx ? dx->stride(0) : 0, ldd = dx ? dx->stride(1) : 0;
  const int threads = at::get_num_threads();
  const int64_t stride = k * c + k;  // one thread's partial dW (K, C), then its partial db
  std::vector<float> parts(threads * stride, 0.f);
  const int64_t per_image = (p + kImagesChunk - 1) / kImagesChunk, ldt = round_up(c, 16);
  block_chunks(n * per_image, threads, [&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<float> xt(kImagesChunk * ldt), db_lanes(db && dxp ? 16 * k : 0, 0.f);
    float* part = parts.data() + chunk * stride;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / per_image, p0 = t % per_image * kImagesChunk, cols = std::min(kImagesChunk, p - p0);
      const float* g = gp + image * gs0 + p0;
      const float *next = nullptr, *next_x = nullptr;
      if (t + 1 < end) {
        const int64_t next_image = (t + 1) / per_image, next_p0 = (t + 1) % per_image * kImagesChunk;
        next = gp + next_image * gs0 + next_p0;
        if (per_image > 1 && c <= kImagesPrefetchMaxIn) next_x = xp + next_image * xs0 + next_p0;
      }
      if (next_x) {
        transpose_chunk<true>(xp + image * xs0 + p0, ldx, c, cols, xt.data(), ldt, next_x);
      } else {
        transpose_chunk<false>(xp + image * xs0 + p0, ldx, c, cols, xt.data(), ldt, nullptr);
      }
      for (int64_t c0 = 0; c0 < c; c0 += 64) {  // panels of up to four vectors of input channels
        __mmask16 masks[4];
        panel_masks(std::min<int64_t>(64, c - c0), masks);
        dispatch_count<4>(vector_count(c - c0), 0, [&]<int V>(int64_t) {
          each_tile<24 / V>(k, [&]<int R>(int64_t k0) {
            images_grad_tile<R, V>(cols, g + k0 * ldg, ldg, xt.data() + c0, ldt, part + k0 * c + c0, c, masks,
                                   next && c0 == 0 ? next + k0 * ldg : nullptr);
          });
        });
      }
      if (db && !dxp) row_sums(k, cols, g, ldg, part + k * c);
      if (dxp) {  // wt @ the chunk: wt's rows broadcast, the chunk's channel rows the vectors, 48 pixels a panel
        dx_rows<3>(c, wtp, ldwt, g, ldg, cols, k, dxp + image * ds0 + p0, ldd, db ? db_lanes.data() : nullptr);
      }
    }
    if (db && dxp) lane_sums(k, db_lanes.data(), part + k * c);
  });
  sum_partials(parts, threads, k * c, dw, db);
}

#endif  // __x86_64__

void linear_out(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& out,
                int64_t stream_min_bytes) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(w.scalar_type() == dtype && out.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              "convlab::linear_out: x, w and out must all be float32 or all bfloat16, got ", dtype, ", ", w.scalar_type(),
              " and ", out.scalar_type());
  TORCH_CHECK(cpu_supports(dtype), "convlab::linear_out: this CPU lacks the AVX-512 instructions for ", dtype,
              " (ask convlab::linear_supported first)");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "convlab::linear_out: x, w and out must be 2-d, got ",
              x.dim(), ", ", w.dim(), " and ", out.dim());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && out.device().is_cpu(), "convlab::linear_out: CPU tensors only");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k && out.size(0) == m && out.size(1) == n, "convlab::linear_out: shapes ", x.sizes(), " @ ",
              w.sizes(), "^T do not give ", out.sizes());
  TORCH_CHECK((x.stride(1) == 1 || k == 1) && (out.stride(1) == 1 || n == 1), "convlab::linear_out: x and out need unit "
              "column strides, got ", x.strides(), " and ", out.strides());
  TORCH_CHECK(k > 0, "convlab::linear_out: x has no columns to reduce over (shape ", x.sizes(), ")");
  TORCH_CHECK(dtype == at::kFloat || k % 2 == 0, "convlab::linear_out: bfloat16 multiplies pairs of columns: x needs "
              "an even number of them, got shape ", x.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == dtype && bias->device().is_cpu(),
                "convlab::linear_out: bias must be ", dtype, " of shape [", n, "], got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  if (m == 0 || n == 0) return;
#if defined(__x86_64__)
  const auto run_panels = [&]<typename T>() {
    switch (linear_vectors(n)) {
      case 4: return run<T, 4>(x, w, bias, out, stream_min_bytes);
      case 3: return run<T, 3>(x, w, bias, out, stream_min_bytes);
      case 2: return run<T, 2>(x, w, bias, out, stream_min_bytes);
      default: return run<T, 1>(x, w, bias, out, stream_min_bytes);
    }
  };
  if (dtype == at::kFloat) {
    run_panels.template operator()<float>();
  } else {
    run_panels.template operator()<bf16_bits>();
  }
#endif
}

void images_out(const at::Tensor& w, const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& out,
                int64_t stream_min_bytes) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "convlab::images_out: w, x and out must all be float32, got ", w.scalar_type(), ", ", x.scalar_type(),
              " and ", out.scalar_type());
  TORCH_CHECK(cpu_supports(at::kFloat), "convlab::images_out: this CPU lacks AVX-512F (ask convlab::linear_supported first)");
  TORCH_CHECK(w.dim() == 2 && x.dim() == 3 && out.dim() == 3, "convlab::images_out: w must be 2-d, x and out 3-d, got ",
              w.dim(), ", ", x.dim(), " and ", out.dim());
  TORCH_CHECK(w.device().is_cpu() && x.device().is_cpu() && out.device().is_cpu(), "convlab::images_out: CPU tensors only");
  const int64_t n = x.size(0), c = x.size(1), p = x.size(2), k = w.size(0);
  TORCH_CHECK(w.size(1) == c && out.size(0) == n && out.size(1) == k && out.size(2) == p, "convlab::images_out: shapes ",
              w.sizes(), " @ ", x.sizes(), " do not give ", out.sizes());
  TORCH_CHECK((w.stride(1) == 1 || c == 1) && (x.stride(2) == 1 || p == 1) && (out.stride(2) == 1 || p == 1),
              "convlab::images_out: w, x and out need unit last strides, got ", w.strides(), ", ", x.strides(), " and ",
              out.strides());
  TORCH_CHECK(c > 0, "convlab::images_out: x has no channels to reduce over (shape ", x.sizes(), ")");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k && bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "convlab::images_out: bias must be float32 of shape [", k, "], got ", bias->scalar_type(), " ",
                bias->sizes());
  }
  if (n == 0 || k == 0 || p == 0) return;
#if defined(__x86_64__)
  run_images(w, x, bias, out, stream_min_bytes);
#endif
}

// The bias gradient, where asked for: a contiguous [k] (its dtype and device are checked with the other tensors).
void check_bias_grad(const std::optional<at::Tensor>& db, int64_t k, const char* op) {
  if (db) {
    TORCH_CHECK(db->dim() == 1 && db->size(0) == k && db->is_contiguous(), "convlab::", op, ": db must be a contiguous [",
                k, "], got ", db->sizes());
  }
}

void rows_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dwt, const std::optional<at::Tensor>& db,
                   const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& dx) {
  const at::ScalarType dtype = grad.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype &&
                  dwt.scalar_type() == at::kFloat && (!db || db->scalar_type() == at::kFloat),
              "convlab::rows_backward: grad and x must be both float32 or both bfloat16, dwt and db float32, got ",
              dtype, ", ", x.scalar_type(), " and ", dwt.scalar_type());
  TORCH_CHECK(cpu_supports(dtype), "convlab::rows_backward: this CPU lacks the AVX-512 instructions for ", dtype,
              " (ask convlab::linear_supported first)");
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && dwt.dim() == 2, "convlab::rows_backward: grad, x and dwt must be "
              "2-d, got ", grad.dim(), ", ", x.dim(), " and ", dwt.dim());
  TORCH_CHECK(grad.device().is_cpu() && x.device().is_cpu() && dwt.device().is_cpu() && (!db || db->device().is_cpu()),
              "convlab::rows_backward: CPU tensors only");
  const int64_t m = grad.size(0), k = grad.size(1), c = x.size(1);
  TORCH_CHECK(x.size(0) == m && dwt.size(0) == c && dwt.size(1) == k, "convlab::rows_backward: shapes ", x.sizes(),
              "^T @ ", grad.sizes(), " do not give ", dwt.sizes());
  TORCH_CHECK((grad.stride(1) == 1 || k == 1) && (x.stride(1) == 1 || c == 1) && dwt.is_contiguous(),
              "convlab::rows_backward: grad and x need unit column strides and dwt must be contiguous, got ",
              grad.strides(), ", ", x.strides(), " and ", dwt.strides());
  check_bias_grad(db, k, "rows_backward");
  TORCH_CHECK(w.has_value() == dx.has_value(), "convlab::rows_backward: w and dx come together (dx = grad @ w)");
  if (w) {
    TORCH_CHECK(w->scalar_type() == dtype && dx->scalar_type() == dtype && w->device().is_cpu() &&
                    dx->device().is_cpu(),
                "convlab::rows_backward: w and dx must be CPU tensors of grad's dtype ", dtype, ", got ",
                w->scalar_type(), " and ", dx->scalar_type());
    TORCH_CHECK(dtype == at::kFloat || k % 2 == 0, "convlab::rows_backward: bfloat16 dx multiplies pairs of grad's "
                "columns: grad needs an even number of them, got shape ", grad.sizes());
    TORCH_CHECK(w->dim() == 2 && w->size(0) == k && w->size(1) == c && dx->dim() == 2 && dx->size(0) == m &&
                    dx->size(1) == c,
                "convlab::rows_backward: dx = grad @ w needs w [", k, ", ", c, "] and dx [", m, ", ", c, "], got ",
                w->sizes(), " and ", dx->sizes());
    TORCH_CHECK((w->stride(1) == 1 || c == 1) && (dx->stride(1) == 1 || c == 1),
                "convlab::rows_backward: w and dx need unit column strides, got ", w->strides(), " and ", dx->strides());
  }
  if (c == 0 || k == 0) {
    if (dx) dx->zero_();  // no outputs to sum over: dX is zero
    return;
  }
#if defined(__x86_64__)
  if (dtype == at::kFloat) {
    run_weight_grad(grad, x, dwt, db, w, dx);
  } else {
    run_backward_bf16(grad, x, dwt, db, w, dx);
  }
#endif
}

void images_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& db,
                     const std::optional<at::Tensor>& wt, const std::optional<at::Tensor>& dx) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && dw.scalar_type() == at::kFloat &&
                  (!db || db->scalar_type() == at::kFloat) && (!wt || wt->scalar_type() == at::kFloat) &&
                  (!dx || dx->scalar_type() == at::kFloat),
              "convlab::images_backward: every tensor must be float32, got grad ", grad.scalar_type(), ", x ",
              x.scalar_type(), " and dw ", dw.scalar_type());
  TORCH_CHECK(cpu_supports(at::kFloat), "convlab::images_backward: this CPU lacks AVX-512F (ask convlab::linear_supported first)");
  TORCH_CHECK(grad.dim() == 3 && x.dim() == 3 && dw.dim() == 2, "convlab::images_backward: grad and x must be 3-d, dw "
              "2-d, got ", grad.dim(), ", ", x.dim(), " and ", dw.dim());
  TORCH_CHECK(grad.device().is_cpu() && x.device().is_cpu() && dw.device().is_cpu() && (!db || db->device().is_cpu()) &&
                  (!wt || wt->device().is_cpu()) && (!dx || dx->device().is_cpu()),
              "convlab::images_backward: CPU tensors only");
  const int64_t n = grad.size(0), k = grad.size(1), p = grad.size(2), c = x.size(1);
  TORCH_CHECK(x.size(0) == n && x.size(2) == p && dw.size(0) == k && dw.size(1) == c, "convlab::images_backward: shapes ",
              grad.sizes(), " @ ", x.sizes(), "^T do not give ", dw.sizes());
  TORCH_CHECK((grad.stride(2) == 1 || p == 1) && (x.stride(2) == 1 || p == 1) && dw.is_contiguous(),
              "convlab::images_backward: grad and x need unit pixel strides and dw must be contiguous, got ",
              grad.strides(), ", ", x.strides(), " and ", dw.strides());
  check_bias_grad(db, k, "images_backward");
  TORCH_CHECK(wt.has_value() == dx.has_value(), "convlab::images_backward: wt and dx come together (dx[n] = wt @ grad[n])");
  if (wt) {
    TORCH_CHECK(wt->dim() == 2 && wt->size(0) == c && wt->size(1) == k && dx->dim() == 3 && dx->size(0) == n &&
                    dx->size(1) == c && dx->size(2) == p,
                "convlab::images_backward: dx[n] = wt @ grad[n] needs wt [", c, ", ", k, "] and dx [", n, ", ", c, ", ",
                p, "], got ", wt->sizes(), " and ", dx->sizes());
    TORCH_CHECK((wt->stride(1) == 1 || k == 1) && (dx->stride(2) == 1 || p == 1),
                "convlab::images_backward: wt and dx need unit last strides, got ", wt->strides(), " and ", dx->strides());
  }
  if (n == 0 || p == 0 || k == 0 || c == 0) {  // an empty sum: zero gradients
    dw.zero_();
    if (db) db->zero_();
    if (dx) dx->zero_();
    return;
  }
#if defined(__x86_64__)
  run_images_backward(grad, x, dw, db, wt, dx);
#endif
}

bool linear_supported(at::ScalarType dtype) { return cpu_supports(dtype); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(convlab, m) {
  m.def("linear_out(Tensor x, Tensor w, Tensor? bias, Tensor(c!) out, int stream_min_bytes) -> ()");
  m.def("images_out(Tensor w, Tensor x, Tensor? bias, Tensor(c!) out, int stream_min_bytes) -> ()");
  m.def("rows_backward(Tensor grad, Tensor x, Tensor(a!) dwt, Tensor(b!)? db, Tensor? w=None, Tensor(c!)? dx=None) -> ()");
  m.def("images_backward(Tensor grad, Tensor x, Tensor(a!) dw, Tensor(b!)? db, Tensor? wt=None, Tensor(c!)? dx=None) -> ()");
  m.def("linear_supported(ScalarType dtype) -> bool", &linear_supported);
}

TORCH_LIBRARY_IMPL(convlab, CPU, m) {
  m.impl("linear_out", linear_out);
  m.impl("images_out", images_out);
  m.impl("rows_backward", rows_backward);
  m.impl("images_backward", images_backward);
}
