// Fused weighted soft-target cross-entropy on CPU: torch.ops.dino_fast_native.weighted_cross_entropy_fwd / _bwd.
//
// Same contract and math as kernels/cross_entropy.py (derivation there). Row r of the student
// (R, K) uses target row r mod T and weight w_r; with x = s_r / tau_s:
//   forward:  M = max_k x_k, Z = sum_k e^(x_k - M), S = sum_k q_k, D = sum_k q_k (M - x_k) >= 0,
//             h_r = S log Z + D (no cancellation), loss = sum_r w_r h_r; saves (M, log Z, S) per row.
//   backward: ds_rk = g w_r / tau_s (S e^((x_k - M) - log Z) - q_k).
// Targets are read in the accumulation dtype (a bf16 target is widened once, (T, K)). A row fits in
// cache, so each pass reads it twice instead of keeping running statistics. Rows of weight 0 are
// skipped (no statistics written, zero gradient). Threads split the rows
// (at::parallel_for); the loss is summed in fp64 in row order, so it does not depend on threading.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "simd_math.h"

namespace {

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> forward_typed(const at::Tensor& student, const at::Tensor& target,
                                                 const at::Tensor& weights, double student_temp) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t R = student.size(0), K = student.size(1), T = target.size(0);
  const auto opts = student.options().dtype(acc_type);
  at::Tensor stats = at::empty({R, 3}, opts);
  const at::Tensor w_acc = weights.to(acc_type).contiguous();
  const scalar_t* s = student.data_ptr<scalar_t>();
  const acc_t* q_all = target.data_ptr<acc_t>();
  const acc_t* w = w_acc.data_ptr<acc_t>();
  acc_t* st = stats.data_ptr<acc_t>();
  const acc_t temp = static_cast<acc_t>(student_temp);
  std::vector<acc_t> row_loss(static_cast<size_t>(R), acc_t(0));
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> sbuf(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
      if (w[r] == acc_t(0)) continue;
      const acc_t* row = widen<scalar_t, acc_t>(s + r * K, K, sbuf.data());
      const acc_t* q = q_all + (r % T) * K;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t k = 0; k < K; ++k) {
        const acc_t x = row[k] / temp;
        m = x > m ? x : m;
      }
      acc_t z = 0, mass = 0, d = 0;
#pragma omp simd reduction(+ : z, mass, d)
      for (int64_t k = 0; k < K; ++k) {
        const acc_t x = row[k] / temp;
        z += vexp(x - m);
        mass += q[k];
        d += q[k] * (m - x);
      }
      const acc_t log_z = std::log(z);
      st[3 * r] = m;
      st[3 * r + 1] = log_z;
      st[3 * r + 2] = mass;
      row_loss[r] = w[r] * (mass * log_z + d);
    }
  });
  double total = 0;
  for (int64_t r = 0; r < R; ++r) total += static_cast<double>(row_loss[r]);
  return {at::scalar_tensor(total, opts), stats};
}

template <typename scalar_t, typename acc_t>
at::Tensor backward_typed(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& target,
                          const at::Tensor& weights, const at::Tensor& stats_in, double student_temp) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t R = student.size(0), K = student.size(1), T = target.size(0);
  const at::Tensor w_acc = weights.to(acc_type).contiguous();
  const at::Tensor stats = stats_in.to(acc_type).contiguous();
  at::Tensor grad = at::empty({R, K}, student.options());
  const scalar_t* s = student.data_ptr<scalar_t>();
  const acc_t* q_all = target.data_ptr<acc_t>();
  const acc_t* w = w_acc.data_ptr<acc_t>();
  const acc_t* st = stats.data_ptr<acc_t>();
  scalar_t* g = grad.data_ptr<scalar_t>();
  const acc_t temp = static_cast<acc_t>(student_temp);
  const acc_t upstream = static_cast<acc_t>(grad_loss.item<double>());  // a CPU scalar: no sync
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> sbuf(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* out = g + r * K;
      if (w[r] == acc_t(0)) {
        for (int64_t k = 0; k < K; ++k) out[k] = scalar_t(0);
        continue;
      }
      const acc_t* row = widen<scalar_t, acc_t>(s + r * K, K, sbuf.data());
      const acc_t* q = q_all + (r % T) * K;
      const acc_t m = st[3 * r], log_z = st[3 * r + 1], mass = st[3 * r + 2];
      const acc_t scale = upstream * w[r] / temp;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const acc_t p = vexp((row[k] / temp - m) - log_z);
        out[k] = static_cast<scalar_t>(scale * (mass * p - q[k]));
      }
    }
  });
  return grad;
}

void check_inputs(const char* op, const at::Tensor& student, const at::Tensor& target, const at::Tensor& weights) {
  TORCH_CHECK(student.dim() == 2 && target.dim() == 2 && student.size(1) == target.size(1), op,
              ": student (R, K) and target (T, K) expected, got ", student.sizes(), " and ", target.sizes());
  TORCH_CHECK(target.size(0) > 0 && student.size(0) % target.size(0) == 0, op, ": student rows ", student.size(0),
              " must be a multiple of target rows ", target.size(0));
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == student.size(0), op, ": weights must be (R,), got ",
              weights.sizes());
}

std::tuple<at::Tensor, at::Tensor> weighted_cross_entropy_fwd_cpu(const at::Tensor& student_in,
                                                                  const at::Tensor& target_in,
                                                                  const at::Tensor& weights, double student_temp) {
  const char* op = "dino_fast_native::weighted_cross_entropy_fwd";
  check_inputs(op, student_in, target_in, weights);
  const at::Tensor student = student_in.contiguous();
  switch (student.scalar_type()) {
    case at::kFloat:
      return forward_typed<float, float>(student, target_in.to(at::kFloat).contiguous(), weights, student_temp);
    case at::kBFloat16:
      return forward_typed<c10::BFloat16, float>(student, target_in.to(at::kFloat).contiguous(), weights,
                                                 student_temp);
    case at::kHalf:
      return forward_typed<c10::Half, float>(student, target_in.to(at::kFloat).contiguous(), weights, student_temp);
    case at::kDouble:
      return forward_typed<double, double>(student, target_in.to(at::kDouble).contiguous(), weights, student_temp);
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", student.scalar_type(), "; use fp32, bf16, fp16 or fp64");
  }
}

at::Tensor weighted_cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_in,
                                          const at::Tensor& target_in, const at::Tensor& weights,
                                          const at::Tensor& stats, double student_temp) {
  const char* op = "dino_fast_native::weighted_cross_entropy_bwd";
  check_inputs(op, student_in, target_in, weights);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value, got shape ", grad_loss.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == student_in.size(0) && stats.size(1) == 3, op,
              ": stats must be (R, 3) (max, log-sum, target mass), got ", stats.sizes());
  const at::Tensor student = student_in.contiguous();
  switch (student.scalar_type()) {
    case at::kFloat:
      return backward_typed<float, float>(grad_loss, student, target_in.to(at::kFloat).contiguous(), weights, stats,
                                          student_temp);
    case at::kBFloat16:
      return backward_typed<c10::BFloat16, float>(grad_loss, student, target_in.to(at::kFloat).contiguous(),
                                                  weights, stats, student_temp);
    case at::kHalf:
      return backward_typed<c10::Half, float>(grad_loss, student, target_in.to(at::kFloat).contiguous(), weights,
                                              stats, student_temp);
    case at::kDouble:
      return backward_typed<double, double>(grad_loss, student, target_in.to(at::kDouble).contiguous(), weights,
                                            stats, student_temp);
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", student.scalar_type(), "; use fp32, bf16, fp16 or fp64");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_fast_native, m) {
  m.def("weighted_cross_entropy_fwd(Tensor student, Tensor target, Tensor weights, float student_temp) -> (Tensor, Tensor)");
  m.def(
      "weighted_cross_entropy_bwd(Tensor grad_loss, Tensor student, Tensor target, Tensor weights, Tensor stats, "
      "float student_temp) -> Tensor");
}

TORCH_LIBRARY_IMPL(dino_fast_native, CPU, m) {
  m.impl("weighted_cross_entropy_fwd", &weighted_cross_entropy_fwd_cpu);
  m.impl("weighted_cross_entropy_bwd", &weighted_cross_entropy_bwd_cpu);
}
