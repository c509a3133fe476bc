// convlab's one native op: a matrix product written into a given output, on oneDNN's matmul primitive.
//
// pointwise_conv2d lowers a 1x1 convolution to matrix products. In Python, torch runs fp32 products
// on its BLAS (MKL's sgemm, half oneDNN's speed on some CPUs) and oneDNN's inner product only into a
// fresh output, so an NCHW image's product had to be copied into place. at::native::mkldnn_matmul,
// which torch itself calls for bf16 mm/bmm, takes 2-d or batched 3-d operands by their strides and
// writes `out = beta * out + a @ b`. Built by models/native.py; see there for the fallback.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace at::native {
// Declared in ATen/native/mkldnn/Matmul.h, which torch's wheels do not ship; exported as TORCH_API.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace {

// Checked here, not left to oneDNN: a mismatched shape there reads or writes out of bounds.
void matmul_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, double beta) {
  TORCH_CHECK(a.dim() == b.dim() && a.dim() == out.dim() && (a.dim() == 2 || a.dim() == 3),
              "convlab::matmul_out: operands must all be 2-d or all 3-d, got ", a.dim(), ", ", b.dim(), " and ", out.dim());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(), "convlab::matmul_out: CPU tensors only");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == out.scalar_type(),
              "convlab::matmul_out: one dtype for all three, got ", a.scalar_type(), ", ", b.scalar_type(), " and ", out.scalar_type());
  const int64_t d = a.dim();
  TORCH_CHECK(a.size(d - 1) == b.size(d - 2) && out.size(d - 2) == a.size(d - 2) && out.size(d - 1) == b.size(d - 1),
              "convlab::matmul_out: shapes ", a.sizes(), " @ ", b.sizes(), " do not give ", out.sizes());
  if (d == 3) {
    const int64_t n = out.size(0);
    TORCH_CHECK((a.size(0) == n || a.size(0) == 1) && (b.size(0) == n || b.size(0) == 1),
                "convlab::matmul_out: batch sizes ", a.size(0), " and ", b.size(0), " do not broadcast to ", n);
  }
  at::native::mkldnn_matmul(a, b, out, static_cast<float>(beta), 1.0f);
}

}  // namespace

TORCH_LIBRARY(convlab, m) {
  m.def("matmul_out(Tensor a, Tensor b, Tensor(c!) out, float beta=0.) -> ()");
}

// A CPU kernel rather than a composite one: dispatch sees one op (tests count it), not its insides.
// No autograd kernel: pointwise_conv2d calls it with grad off, inside its autograd Functions.
TORCH_LIBRARY_IMPL(convlab, CPU, m) {
  m.impl("matmul_out", matmul_out);
}
