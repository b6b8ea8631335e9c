// Sinkhorn-Knopp on CPU: the two passes over the logits that dino_fast/ops/sinkhorn.py's native
// backend needs (derivation there), torch.ops.dino_fast_native.sinkhorn_column_max / sinkhorn_exp.
// With a_bk = x_bk / tau:
//   sinkhorn_column_max(x, tau)        m_k = max_b a_bk                       (K,)
//   sinkhorn_exp(x, tau, m)            E_bk = exp(a_bk - m_k) <= 1            (B, K)
// in fp32 (fp64 for fp64 logits). The iterations then run as matrix-vector products on E, which
// becomes the output in place: on a CPU the exponentials are the cost, so each is taken once.
// The column max splits the columns into blocks of 512 and walks down the rows (each thread owns
// its columns); the exponentials split the rows. bf16/fp16 rows are widened to fp32 once. Exponents
// below -87 give 0 (the fp32 exp clamps there, and a weight e^-87 next to its column's 1 is nothing).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "simd_math.h"

namespace {

constexpr int64_t kColumnBlock = 512;

template <typename acc_t>
DF_INLINE acc_t exp_or_zero(acc_t x) {
  return x < acc_t(-87) ? acc_t(0) : vexp(x);
}

template <typename scalar_t, typename acc_t>
at::Tensor column_max(const at::Tensor& x, double temp_d) {
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({K}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* o = out.data_ptr<acc_t>();
  const scalar_t* data = x.data_ptr<scalar_t>();
  const acc_t temp = static_cast<acc_t>(temp_d);
  const int64_t n_blocks = (K + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> buf(static_cast<size_t>(kColumnBlock));
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k0 = j * kColumnBlock, width = std::min(kColumnBlock, K - k0);
      acc_t* acc = o + k0;
      for (int64_t k = 0; k < width; ++k) acc[k] = -std::numeric_limits<acc_t>::infinity();
      for (int64_t b = 0; b < B; ++b) {
        const acc_t* row = widen<scalar_t, acc_t>(data + b * K + k0, width, buf.data());
#pragma omp simd
        for (int64_t k = 0; k < width; ++k) {
          const acc_t a = row[k] / temp;
          acc[k] = a > acc[k] ? a : acc[k];
        }
      }
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t>
at::Tensor exponentials(const at::Tensor& x, double temp_d, const at::Tensor& shift_in) {
  const int64_t B = x.size(0), K = x.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  TORCH_CHECK(shift_in.numel() == K, "dino_fast_native::sinkhorn_exp: shift must hold K=", K, " values, got ",
              shift_in.sizes());
  const at::Tensor shift_t = shift_in.to(acc_type).contiguous();
  at::Tensor out = at::empty({B, K}, x.options().dtype(acc_type));
  acc_t* o = out.data_ptr<acc_t>();
  const acc_t* shift = shift_t.data_ptr<acc_t>();
  const scalar_t* data = x.data_ptr<scalar_t>();
  const acc_t temp = static_cast<acc_t>(temp_d);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(static_cast<size_t>(K));
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* row = widen<scalar_t, acc_t>(data + b * K, K, buf.data());
      acc_t* dst = o + b * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) dst[k] = exp_or_zero(row[k] / temp - shift[k]);
    }
  });
  return out;
}

// Runs fn(scalar_t{}, acc_t{}) for x's dtype.
template <typename Fn>
at::Tensor dispatch(const char* op, const at::Tensor& x, Fn&& fn) {
  TORCH_CHECK(x.dim() == 2, op, ": logits must be (B, K), got ", x.sizes());
  switch (x.scalar_type()) {
    case at::kFloat:
      return fn(float{}, float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{}, float{});
    case at::kHalf:
      return fn(c10::Half{}, float{});
    case at::kDouble:
      return fn(double{}, double{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type(), "; use fp32, bf16, fp16 or fp64");
  }
}

at::Tensor sinkhorn_column_max_cpu(const at::Tensor& x_in, double temp) {
  const at::Tensor x = x_in.contiguous();
  return dispatch("dino_fast_native::sinkhorn_column_max", x, [&](auto s, auto a) {
    return column_max<decltype(s), decltype(a)>(x, temp);
  });
}

at::Tensor sinkhorn_exp_cpu(const at::Tensor& x_in, double temp, const at::Tensor& shift) {
  const at::Tensor x = x_in.contiguous();
  return dispatch("dino_fast_native::sinkhorn_exp", x, [&](auto s, auto a) {
    return exponentials<decltype(s), decltype(a)>(x, temp, shift);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_fast_native, m) {
  m.def("sinkhorn_column_max(Tensor logits, float temp) -> Tensor");
  m.def("sinkhorn_exp(Tensor logits, float temp, Tensor shift) -> Tensor");
}

TORCH_LIBRARY_IMPL(dino_fast_native, CPU, m) {
  m.impl("sinkhorn_column_max", &sinkhorn_column_max_cpu);
  m.impl("sinkhorn_exp", &sinkhorn_exp_cpu);
}
