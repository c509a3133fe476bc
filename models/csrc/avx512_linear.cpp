// convlab's fp32 CPU product with its bias: out = x @ w^T + bias, on AVX-512 register tiles.
//
// On channels_last input a 1x1 convolution is that product on the (N*H*W, C) rows. oneDNN's matmul
// (onednn_matmul.cpp) takes no bias, so the bias cost a second pass over the output, and oneDNN's inner
// product, which adds it as it writes, ran at 0.84-0.94x torch's convolution on six layers on two threads
// (benchmarks/README.md). Here each 6-row x 64-column tile of out is 24 vector accumulators that start
// at the bias, run the whole reduction and are stored once. Outputs of at least `stream_min_bytes` are
// written with non-temporal stores, which skip reading the lines into the cache first. Built by
// models/native.py; compiled for any x86-64 CPU, it runs only where the CPU reports AVX-512F.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kTileRows = 6;       // MR: 6 rows x 4 vectors = 24 of the 32 zmm registers accumulate
constexpr int64_t kPanel = 64;         // NR: columns of w^T packed together, four 16-float vectors
constexpr int64_t kTaskRows = 48;      // rows of one parallel task
constexpr int64_t kTaskPanels = 2;     // panels of one parallel task
constexpr int64_t kDepth = 256;        // reduction block: one panel's slice is 64 KiB, read from L2

bool cpu_has_avx512() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

#if defined(__x86_64__)

// c[0:R, 0:64) (columns masked) = start + sum_k a[r, k] * panel[k, :], where start is the bias (first
// reduction block) or what c holds (later blocks). `stream`: full, aligned tiles of the last block.
template <int R, bool kStream>
__attribute__((target("avx512f"))) inline void tile(const float* a, int64_t lda, const float* panel, int64_t depth,
                                                   const float* bias, float* c, int64_t ldc, const __mmask16* masks) {
  __m512 acc[R][4];  // the loops over r and v unroll fully (the pragmas), so acc lives in registers
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      acc[r][v] = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_maskz_loadu_ps(masks[v], c + r * ldc + 16 * v);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    const float* p = panel + k * kPanel;
    const __m512 b0 = _mm512_loadu_ps(p), b1 = _mm512_loadu_ps(p + 16);
    const __m512 b2 = _mm512_loadu_ps(p + 32), b3 = _mm512_loadu_ps(p + 48);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, b3, acc[r][3]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      if constexpr (kStream) {
        _mm512_stream_ps(c + r * ldc + 16 * v, acc[r][v]);
      } else {
        _mm512_mask_storeu_ps(c + r * ldc + 16 * v, masks[v], acc[r][v]);
      }
    }
  }
}

template <bool kStream>
__attribute__((target("avx512f"))) void tile_rows(int64_t rows, const float* a, int64_t lda, const float* panel,
                                                  int64_t depth, const float* bias, float* c, int64_t ldc,
                                                  const __mmask16* masks) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) {
    tile<kTileRows, kStream>(a + r * lda, lda, panel, depth, bias, c + r * ldc, ldc, masks);
  }
  a += r * lda;
  c += r * ldc;
  switch (rows - r) {  // the last rows: plain stores, whose lines are few
    case 5: tile<5, false>(a, lda, panel, depth, bias, c, ldc, masks); break;
    case 4: tile<4, false>(a, lda, panel, depth, bias, c, ldc, masks); break;
    case 3: tile<3, false>(a, lda, panel, depth, bias, c, ldc, masks); break;
    case 2: tile<2, false>(a, lda, panel, depth, bias, c, ldc, masks); break;
    case 1: tile<1, false>(a, lda, panel, depth, bias, c, ldc, masks); break;
    default: break;
  }
}

struct Problem {
  const float* x;
  int64_t ldx;
  const float* packed;  // w^T in panels: panel p holds rows k of columns [64p, 64p + 64), zero-padded
  const float* bias;    // padded to whole panels, zeros without a bias
  float* out;
  int64_t ldo, k, n;
  bool stream;
};

// Rows [m0, m1) x panels [p0, p1) of out, reduction block by block.
__attribute__((target("avx512f"))) void run_task(const Problem& pr, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t k0 = 0; k0 < pr.k; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, pr.k - k0);
    const bool last = k0 + depth == pr.k;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kPanel, pr.n - p * kPanel);
      __mmask16 masks[4];
      for (int v = 0; v < 4; ++v) {
        const int64_t left = std::clamp<int64_t>(cols - 16 * v, 0, 16);
        masks[v] = static_cast<__mmask16>((1u << left) - 1u);
      }
      const float* panel = pr.packed + p * pr.k * kPanel + k0 * kPanel;
      const float* bias = k0 == 0 ? pr.bias + p * kPanel : nullptr;
      const float* a = pr.x + m0 * pr.ldx + k0;
      float* c = pr.out + m0 * pr.ldo + p * kPanel;
      if (pr.stream && last && cols == kPanel) {
        tile_rows<true>(m1 - m0, a, pr.ldx, panel, depth, bias, c, pr.ldo, masks);
      } else {
        tile_rows<false>(m1 - m0, a, pr.ldx, panel, depth, bias, c, pr.ldo, masks);
      }
    }
  }
}

#endif  // __x86_64__

void linear_out(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& out,
                int64_t stream_min_bytes) {
  TORCH_CHECK(cpu_has_avx512(), "convlab::linear_out: this CPU has no AVX-512F (ask convlab::linear_supported() first)");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "convlab::linear_out: x, w and out must be 2-d, got ",
              x.dim(), ", ", w.dim(), " and ", out.dim());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && out.device().is_cpu(), "convlab::linear_out: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "convlab::linear_out: float32 only, got ", x.scalar_type(), ", ", w.scalar_type(), " and ", out.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k && out.size(0) == m && out.size(1) == n, "convlab::linear_out: shapes ", x.sizes(), " @ ",
              w.sizes(), "^T do not give ", out.sizes());
  TORCH_CHECK((x.stride(1) == 1 || k == 1) && (out.stride(1) == 1 || n == 1), "convlab::linear_out: x and out need unit "
              "column strides, got ", x.strides(), " and ", out.strides());
  TORCH_CHECK(k > 0, "convlab::linear_out: x has no columns to reduce over (shape ", x.sizes(), ")");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "convlab::linear_out: bias must be float32 of shape [", n, "], got ", bias->scalar_type(), " ", bias->sizes());
  }
  if (m == 0 || n == 0) return;
#if defined(__x86_64__)
  const int64_t panels = (n + kPanel - 1) / kPanel;
  at::Tensor packed = at::empty({panels * k * kPanel}, x.options());
  float* pk = packed.mutable_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const int64_t ws0 = w.stride(0), ws1 = w.stride(1);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = pk + p * k * kPanel;
      const int64_t cols = std::min(kPanel, n - p * kPanel);
      for (int64_t j = 0; j < cols; ++j) {
        const float* src = wp + (p * kPanel + j) * ws0;
        for (int64_t i = 0; i < k; ++i) dst[i * kPanel + j] = src[i * ws1];
      }
      for (int64_t j = cols; j < kPanel; ++j) {
        for (int64_t i = 0; i < k; ++i) dst[i * kPanel + j] = 0.f;
      }
    }
  });
  std::vector<float> padded_bias(panels * kPanel, 0.f);
  if (bias) {
    const float* bp = bias->const_data_ptr<float>();
    for (int64_t j = 0; j < n; ++j) padded_bias[j] = bp[j * bias->stride(0)];
  }
  float* o = out.mutable_data_ptr<float>();
  const int64_t ldo = n == 1 ? 1 : out.stride(0);
  // Non-temporal stores need 64-byte aligned rows: an aligned output whose rows are whole cache lines.
  const bool aligned = reinterpret_cast<uintptr_t>(o) % 64 == 0 && ldo % 16 == 0;
  const Problem pr{x.const_data_ptr<float>(), k == 1 ? 1 : x.stride(0), pk, padded_bias.data(), o, ldo, k, n,
                   aligned && m * n * 4 >= stream_min_bytes};
  const int64_t row_tasks = (m + kTaskRows - 1) / kTaskRows, panel_tasks = (panels + kTaskPanels - 1) / kTaskPanels;
  at::parallel_for(0, row_tasks * panel_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rt = t / panel_tasks, pt = t % panel_tasks;
      run_task(pr, rt * kTaskRows, std::min(m, (rt + 1) * kTaskRows), pt * kTaskPanels,
               std::min(panels, (pt + 1) * kTaskPanels));
    }
    _mm_sfence();  // this thread's non-temporal stores are visible before the caller reads out
  });
#endif
}

bool linear_supported() { return cpu_has_avx512(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(convlab, m) {
  m.def("linear_out(Tensor x, Tensor w, Tensor? bias, Tensor(c!) out, int stream_min_bytes) -> ()");
  m.def("linear_supported() -> bool", &linear_supported);
}

TORCH_LIBRARY_IMPL(convlab, CPU, m) {
  m.impl("linear_out", linear_out);
}
