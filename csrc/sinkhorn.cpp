// Sinkhorn-Knopp passes on CPU: torch.ops.dino_fast_native.sinkhorn_{column_max, prototype_sums,
// sample_sums, assign}, the four passes of dino_fast/ops/sinkhorn.py (derivation there; the same
// contract as kernels/sinkhorn.py). With a_bk = x_bk / tau and E_bk = exp(a_bk - m_k) <= 1:
//   column_max     m_k = max_b a_bk                (K,)
//   prototype_sums u_k = sum_b E_bk c_b            (K,)
//   sample_sums    v_b = sum_k E_bk r_k            (B,)
//   assign         E_bk r_k c_b                    (B, K), fp32 (fp64 for fp64 logits)
// Column passes split the columns into blocks of 512 and walk down the rows (each thread owns its
// columns, so the sums do not depend on the thread count); row passes split the rows. bf16/fp16
// rows are widened to fp32 once per row and block. Exponents below -87 give 0 (the fp32 exp clamps
// there, and a Sinkhorn weight e^-87 next to the column's 1 is nothing).
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

// The column passes: take_max ? max_b a_bk : sum_b E_bk c_b, per column.
template <typename scalar_t, typename acc_t>
at::Tensor column_pass(const at::Tensor& x, double temp_d, const acc_t* shift, const acc_t* c, bool take_max) {
  const int64_t B = x.size(0), K = x.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor out = at::empty({K}, x.options().dtype(acc_type));
  acc_t* o = out.data_ptr<acc_t>();
  const scalar_t* data = x.data_ptr<scalar_t>();
  const acc_t temp = static_cast<acc_t>(temp_d);
  const int64_t n_blocks = (K + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> buf(static_cast<size_t>(kColumnBlock));
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k0 = j * kColumnBlock, width = std::min(kColumnBlock, K - k0);
      acc_t* acc = o + k0;
      const acc_t init = take_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
      for (int64_t k = 0; k < width; ++k) acc[k] = init;
      for (int64_t b = 0; b < B; ++b) {
        const acc_t* row = widen<scalar_t, acc_t>(data + b * K + k0, width, buf.data());
        if (take_max) {
#pragma omp simd
          for (int64_t k = 0; k < width; ++k) {
            const acc_t a = row[k] / temp;
            acc[k] = a > acc[k] ? a : acc[k];
          }
        } else {
          const acc_t cb = c[b];
#pragma omp simd
          for (int64_t k = 0; k < width; ++k) acc[k] += exp_or_zero(row[k] / temp - shift[k0 + k]) * cb;
        }
      }
    }
  });
  return out;
}

// The row passes: sample_sums (out (B,)) or assign (out (B, K)).
template <typename scalar_t, typename acc_t>
at::Tensor row_pass(const at::Tensor& x, double temp_d, const acc_t* shift, const acc_t* r, const acc_t* c) {
  const int64_t B = x.size(0), K = x.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const bool assign = c != nullptr;
  at::Tensor out = assign ? at::empty({B, K}, x.options().dtype(acc_type)) : at::empty({B}, x.options().dtype(acc_type));
  acc_t* o = out.data_ptr<acc_t>();
  const scalar_t* data = x.data_ptr<scalar_t>();
  const acc_t temp = static_cast<acc_t>(temp_d);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(static_cast<size_t>(K));
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* row = widen<scalar_t, acc_t>(data + b * K, K, buf.data());
      if (assign) {
        acc_t* dst = o + b * K;
        const acc_t cb = c[b];
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) dst[k] = exp_or_zero(row[k] / temp - shift[k]) * r[k] * cb;
      } else {
        acc_t v = 0;
#pragma omp simd reduction(+ : v)
        for (int64_t k = 0; k < K; ++k) v += exp_or_zero(row[k] / temp - shift[k]) * r[k];
        o[b] = v;
      }
    }
  });
  return out;
}

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor vector_arg(const at::Tensor& v, const at::Tensor& x, int64_t n, const char* name) {
  TORCH_CHECK(v.numel() == n, "dino_fast_native::sinkhorn: ", name, " must hold ", n, " values, got ", v.sizes());
  return v.to(acc_type_of(x)).contiguous();
}

// Runs fn.template operator()<scalar_t, acc_t>() for x's dtype.
template <typename Fn>
at::Tensor dispatch(const at::Tensor& x, Fn&& fn) {
  TORCH_CHECK(x.dim() == 2, "dino_fast_native::sinkhorn: logits must be (B, K), got ", x.sizes());
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
      TORCH_CHECK(false, "dino_fast_native::sinkhorn: unsupported dtype ", x.scalar_type(),
                  "; use fp32, bf16, fp16 or fp64");
  }
}

at::Tensor sinkhorn_column_max_cpu(const at::Tensor& x_in, double temp) {
  const at::Tensor x = x_in.contiguous();
  return dispatch(x, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    return column_pass<scalar_t, acc_t>(x, temp, nullptr, nullptr, true);
  });
}

at::Tensor sinkhorn_prototype_sums_cpu(const at::Tensor& x_in, double temp, const at::Tensor& shift,
                                       const at::Tensor& c) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor shift_acc = vector_arg(shift, x, x.size(1), "shift");
  const at::Tensor c_acc = vector_arg(c, x, x.size(0), "c");
  return dispatch(x, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    return column_pass<scalar_t, acc_t>(x, temp, shift_acc.data_ptr<acc_t>(), c_acc.data_ptr<acc_t>(), false);
  });
}

at::Tensor sinkhorn_sample_sums_cpu(const at::Tensor& x_in, double temp, const at::Tensor& shift,
                                    const at::Tensor& r) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor shift_acc = vector_arg(shift, x, x.size(1), "shift");
  const at::Tensor r_acc = vector_arg(r, x, x.size(1), "r");
  return dispatch(x, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    return row_pass<scalar_t, acc_t>(x, temp, shift_acc.data_ptr<acc_t>(), r_acc.data_ptr<acc_t>(), nullptr);
  });
}

at::Tensor sinkhorn_assign_cpu(const at::Tensor& x_in, double temp, const at::Tensor& shift, const at::Tensor& r,
                               const at::Tensor& c) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor shift_acc = vector_arg(shift, x, x.size(1), "shift");
  const at::Tensor r_acc = vector_arg(r, x, x.size(1), "r");
  const at::Tensor c_acc = vector_arg(c, x, x.size(0), "c");
  return dispatch(x, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    return row_pass<scalar_t, acc_t>(x, temp, shift_acc.data_ptr<acc_t>(), r_acc.data_ptr<acc_t>(),
                                     c_acc.data_ptr<acc_t>());
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_fast_native, m) {
  m.def("sinkhorn_column_max(Tensor logits, float temp) -> Tensor");
  m.def("sinkhorn_prototype_sums(Tensor logits, float temp, Tensor shift, Tensor c) -> Tensor");
  m.def("sinkhorn_sample_sums(Tensor logits, float temp, Tensor shift, Tensor r) -> Tensor");
  m.def("sinkhorn_assign(Tensor logits, float temp, Tensor shift, Tensor r, Tensor c) -> Tensor");
}

TORCH_LIBRARY_IMPL(dino_fast_native, CPU, m) {
  m.impl("sinkhorn_column_max", &sinkhorn_column_max_cpu);
  m.impl("sinkhorn_prototype_sums", &sinkhorn_prototype_sums_cpu);
  m.impl("sinkhorn_sample_sums", &sinkhorn_sample_sums_cpu);
  m.impl("sinkhorn_assign", &sinkhorn_assign_cpu);
}
