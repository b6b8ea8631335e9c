// Fused DINO loss on CPU: torch.ops.dino_fast_native.dino_loss_fwd / dino_loss_bwd.
//
// Same contract and math as kernels/dino_loss.py (see the derivation there). Per sample b, with
// teacher view t < G, student view v < V, a_tk = (t_k - c_k) / tau_t and x_vk = s_vk / tau_s:
//   forward:  A_t = logsumexp_k a_tk, L_v = logsumexp_k x_vk, and the pair term
//             h_tv = sum_k q_tk (L_v - x_vk) = (L_v - m_v) + (1 / z_t) sum_k e^(a_tk - m_t) (m_v - x_vk)
//             with m = row max and z_t = sum_k e^(a_tk - m_t); both parts are sums of non-negative
//             numbers, so nothing cancels for large logits.
//             loss = sum_b sum_{t != v} h_tv / (G (V - 1) B); also the teacher column sum (K,).
//   backward: ds_vk = g / (tau_s G (V - 1) B) * (n_v e^(x_vk - L_v) - sum_{t != v} e^(a_tk - A_t)),
//             n_v = G - [v < G], rebuilt in one pass from the row statistics the forward saves:
//             (m, log z) per row, so that x - L = (x - m) - log z keeps full precision.
// FP contraction is off for this file's kernels: x = s / tau_s must round the same way in the max,
// the exponentials and the backward, or a saturated softmax stops being exactly one-hot.
//
// Threads split the samples (at::parallel_for, so torch.set_num_threads applies); one sample's
// G teacher weights live in a per-thread (G, K) buffer that every student row of the sample reuses,
// so each input element costs one exp. Inner loops over K are `omp simd` reductions; fp32 uses a
// branch-free exp that vectorizes, and each per-sample routine is compiled for AVX-512, AVX2 and
// baseline x86-64 with the best picked at load time (no -march flags needed). bf16/fp16 rows are
// widened to fp32 once per row; fp64 inputs accumulate in fp64 with std::exp (for validation).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "simd_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#pragma GCC optimize("fp-contract=off")

namespace {

template <typename acc_t>
struct Problem {
  int64_t B, K, V, G;
  acc_t inv_tt, inv_ts;
  const acc_t* center;
};

// One sample's forward: writes its row statistics, adds its teacher rows to `colsum`, returns the
// sum of its pair terms. `w` is (G, K) scratch, `z_t` (G,), `tbuf`/`sbuf` (K,) widening buffers.
template <typename scalar_t, typename acc_t>
DF_INLINE acc_t forward_sample(const Problem<acc_t>& pb, const scalar_t* student, const scalar_t* teacher,
                               int64_t b, acc_t* w, acc_t* z_t, acc_t* tbuf, acc_t* sbuf, acc_t* colsum,
                               acc_t* student_stats, acc_t* teacher_stats) {
  const int64_t K = pb.K;
  const acc_t* c = pb.center;
  const acc_t inv_tt = pb.inv_tt, inv_ts = pb.inv_ts;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t t = 0; t < pb.G; ++t) {
    const acc_t* row = widen<scalar_t, acc_t>(teacher + (t * pb.B + b) * K, K, tbuf);
    acc_t m = neg_inf;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) {
      colsum[k] += row[k];
      const acc_t a = (row[k] - c[k]) * inv_tt;
      m = a > m ? a : m;
    }
    acc_t* wt = w + t * K;
    acc_t z = 0;
#pragma omp simd reduction(+ : z)
    for (int64_t k = 0; k < K; ++k) {
      const acc_t e = vexp((row[k] - c[k]) * inv_tt - m);
      wt[k] = e;
      z += e;
    }
    z_t[t] = z;
    teacher_stats[2 * (t * pb.B + b)] = m;
    teacher_stats[2 * (t * pb.B + b) + 1] = std::log(z);
  }
  acc_t sample_loss = 0;
  for (int64_t v = 0; v < pb.V; ++v) {
    const acc_t* row = widen<scalar_t, acc_t>(student + (v * pb.B + b) * K, K, sbuf);
    acc_t m = neg_inf;
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < K; ++k) {
      const acc_t x = row[k] * inv_ts;
      m = x > m ? x : m;
    }
    // z_v and the first two teacher dot products in one pass; further teacher views (G > 2) get
    // a pass each over the cached row.
    const acc_t* w0 = w;
    const acc_t* w1 = w + (pb.G > 1 ? K : 0);
    acc_t z = 0, d0 = 0, d1 = 0;
#pragma omp simd reduction(+ : z, d0, d1)
    for (int64_t k = 0; k < K; ++k) {
      const acc_t gap = m - row[k] * inv_ts;
      z += vexp(-gap);
      d0 += w0[k] * gap;
      d1 += w1[k] * gap;
    }
    const acc_t log_z = std::log(z);
    student_stats[2 * (v * pb.B + b)] = m;
    student_stats[2 * (v * pb.B + b) + 1] = log_z;
    for (int64_t t = 0; t < pb.G; ++t) {
      acc_t d = t == 0 ? d0 : d1;
      if (t >= 2) {
        const acc_t* wt = w + t * K;
        d = 0;
#pragma omp simd reduction(+ : d)
        for (int64_t k = 0; k < K; ++k) d += wt[k] * (m - row[k] * inv_ts);
      }
      if (t != v) sample_loss += log_z + d / z_t[t];
    }
  }
  return sample_loss;
}

// One sample's backward into `grad` (the student's dtype). `q` is (G, K) scratch, `qsum`, `tbuf`,
// `sbuf`, `obuf` (K,).
template <typename scalar_t, typename acc_t>
DF_INLINE void backward_sample(const Problem<acc_t>& pb, const scalar_t* student, const scalar_t* teacher,
                               const acc_t* student_stats, const acc_t* teacher_stats, acc_t scale, int64_t b,
                               acc_t* q, acc_t* qsum, acc_t* tbuf, acc_t* sbuf, acc_t* obuf, scalar_t* grad,
                               int64_t grad_row_stride) {
  const int64_t K = pb.K;
  const acc_t* c = pb.center;
  const acc_t inv_tt = pb.inv_tt, inv_ts = pb.inv_ts;
  for (int64_t t = 0; t < pb.G; ++t) {
    const acc_t* row = widen<scalar_t, acc_t>(teacher + (t * pb.B + b) * K, K, tbuf);
    const acc_t m = teacher_stats[2 * (t * pb.B + b)], log_z = teacher_stats[2 * (t * pb.B + b) + 1];
    acc_t* qt = q + t * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) qt[k] = vexp(((row[k] - c[k]) * inv_tt - m) - log_z);
  }
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) qsum[k] = q[k];
  for (int64_t t = 1; t < pb.G; ++t) {
    const acc_t* qt = q + t * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) qsum[k] += qt[k];
  }
  for (int64_t v = 0; v < pb.V; ++v) {
    const acc_t* row = widen<scalar_t, acc_t>(student + (v * pb.B + b) * K, K, sbuf);
    const acc_t m = student_stats[2 * (v * pb.B + b)], log_z = student_stats[2 * (v * pb.B + b) + 1];
    const acc_t n_v = static_cast<acc_t>(pb.G - (v < pb.G ? 1 : 0));
    scalar_t* out_row = grad + (v * pb.B + b) * grad_row_stride;
    acc_t* out = nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      out = out_row;
    } else {
      out = obuf;
    }
    if (v < pb.G) {
      const acc_t* own = q + v * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        out[k] = scale * (n_v * vexp((row[k] * inv_ts - m) - log_z) - (qsum[k] - own[k]));
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) out[k] = scale * (n_v * vexp((row[k] * inv_ts - m) - log_z) - qsum[k]);
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) out_row[k] = static_cast<scalar_t>(out[k]);
    }
  }
}

// Non-template entry points, each compiled once per target in DF_CLONES; `ss`/`ts` are the
// student/teacher row statistics, `ld` the gradient's row stride.
#define DF_DEFINE_SAMPLE_FUNCTIONS(suffix, scalar_t, acc_t, attrs)                                             \
  attrs acc_t forward_sample_##suffix(const Problem<acc_t>& pb, const scalar_t* s, const scalar_t* t,        \
                                      int64_t b, acc_t* w, acc_t* z_t, acc_t* tbuf, acc_t* sbuf,             \
                                      acc_t* colsum, acc_t* ss, acc_t* ts) {                                 \
    return forward_sample<scalar_t, acc_t>(pb, s, t, b, w, z_t, tbuf, sbuf, colsum, ss, ts);                \
  }                                                                                                           \
  attrs void backward_sample_##suffix(const Problem<acc_t>& pb, const scalar_t* s, const scalar_t* t,        \
                                      const acc_t* ss, const acc_t* ts, acc_t scale, int64_t b, acc_t* q,    \
                                      acc_t* qsum, acc_t* tbuf, acc_t* sbuf, acc_t* obuf, scalar_t* grad,    \
                                      int64_t ld) {                                                          \
    backward_sample<scalar_t, acc_t>(pb, s, t, ss, ts, scale, b, q, qsum, tbuf, sbuf, obuf, grad, ld);      \
  }                                                                                                           \
  DF_INLINE acc_t forward_sample_dispatch(const Problem<acc_t>& pb, const scalar_t* s, const scalar_t* t,    \
                                          int64_t b, acc_t* w, acc_t* z_t, acc_t* tbuf, acc_t* sbuf,         \
                                          acc_t* colsum, acc_t* ss, acc_t* ts) {                             \
    return forward_sample_##suffix(pb, s, t, b, w, z_t, tbuf, sbuf, colsum, ss, ts);                        \
  }                                                                                                           \
  DF_INLINE void backward_sample_dispatch(const Problem<acc_t>& pb, const scalar_t* s, const scalar_t* t,    \
                                          const acc_t* ss, const acc_t* ts, acc_t scale, int64_t b,          \
                                          acc_t* q, acc_t* qsum, acc_t* tbuf, acc_t* sbuf, acc_t* obuf,      \
                                          scalar_t* grad, int64_t ld) {                                      \
    backward_sample_##suffix(pb, s, t, ss, ts, scale, b, q, qsum, tbuf, sbuf, obuf, grad, ld);              \
  }

DF_DEFINE_SAMPLE_FUNCTIONS(f32, float, float, DF_CLONES)
DF_DEFINE_SAMPLE_FUNCTIONS(bf16, c10::BFloat16, float, DF_CLONES)
DF_DEFINE_SAMPLE_FUNCTIONS(f16, c10::Half, float, DF_CLONES)
DF_DEFINE_SAMPLE_FUNCTIONS(f64, double, double, )

struct Shape {
  int64_t B, K;
};

Shape check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
                   int64_t ncrops, int64_t n_global) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, op, ": student and teacher outputs must be 2-D (rows, K), got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(ncrops >= 2 && n_global >= 1 && n_global <= ncrops, op,
              ": need ncrops >= 2 and 1 <= n_global <= ncrops, got ncrops=", ncrops, ", n_global=", n_global);
  const int64_t rows = student.size(0), K = student.size(1);
  TORCH_CHECK(rows > 0 && rows % ncrops == 0, op, ": student_output has ", rows,
              " rows, not a positive multiple of ncrops=", ncrops);
  const int64_t B = rows / ncrops;
  TORCH_CHECK(teacher.size(0) == n_global * B && teacher.size(1) == K, op,
              ": teacher_output must be (n_global * B, K) = (", n_global * B, ", ", K, "), got ", teacher.sizes());
  TORCH_CHECK(center.numel() == K, op, ": center must hold K=", K, " values, got shape ", center.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": student (", student.scalar_type(),
              ") and teacher (", teacher.scalar_type(), ") outputs must share a dtype");
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && center.device().is_cpu(), op,
              " is the CPU kernel; got tensors on ", student.device(), ", ", teacher.device(), ", ", center.device());
  return {B, K};
}

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_typed(const at::Tensor& student,
                                                                         const at::Tensor& teacher,
                                                                         const at::Tensor& center, Shape shape,
                                                                         int64_t ncrops, int64_t n_global,
                                                                         double teacher_temp, double student_temp) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = student.options().dtype(acc_type);
  const int64_t B = shape.B, K = shape.K, V = ncrops, G = n_global;
  const at::Tensor center_acc = center.reshape({K}).to(acc_type).contiguous();
  const Problem<acc_t> pb{B, K, V, G, static_cast<acc_t>(1.0 / teacher_temp), static_cast<acc_t>(1.0 / student_temp),
                          center_acc.data_ptr<acc_t>()};
  at::Tensor student_stats = at::empty({V * B, 2}, opts);
  at::Tensor teacher_stats = at::empty({G * B, 2}, opts);
  at::Tensor colsum = at::empty({K}, opts);
  const scalar_t* s = student.data_ptr<scalar_t>();
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  acc_t* s_stats = student_stats.data_ptr<acc_t>();
  acc_t* t_stats = teacher_stats.data_ptr<acc_t>();

  // Samples are split into P contiguous parts, each with its own column-sum partial, so the
  // result does not depend on which thread ran which part.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  std::vector<acc_t> colsum_parts(static_cast<size_t>(parts * K), acc_t(0));
  std::vector<acc_t> sample_loss(static_cast<size_t>(B));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> w(static_cast<size_t>(G * K)), z_t(static_cast<size_t>(G)), tbuf(static_cast<size_t>(K)),
        sbuf(static_cast<size_t>(K));
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t b = p * B / parts; b < (p + 1) * B / parts; ++b) {
        sample_loss[b] = forward_sample_dispatch(pb, s, t, b, w.data(), z_t.data(), tbuf.data(), sbuf.data(),
                                                 colsum_parts.data() + p * K, s_stats, t_stats);
      }
    }
  });
  acc_t* cs = colsum.data_ptr<acc_t>();
  at::parallel_for(0, K, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t total = 0;
      for (int64_t p = 0; p < parts; ++p) total += colsum_parts[p * K + k];
      cs[k] = total;
    }
  });
  double total = 0;
  for (int64_t b = 0; b < B; ++b) total += static_cast<double>(sample_loss[b]);
  at::Tensor loss = at::scalar_tensor(total / static_cast<double>(G * (V - 1) * B), opts);
  return {loss, student_stats, teacher_stats, colsum};
}

template <typename scalar_t, typename acc_t>
at::Tensor backward_typed(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& center, const at::Tensor& student_stats, const at::Tensor& teacher_stats,
                          Shape shape, int64_t ncrops, int64_t n_global, double teacher_temp, double student_temp,
                          const std::optional<at::Tensor>& grad_out) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = shape.B, K = shape.K, V = ncrops, G = n_global;
  const at::Tensor center_acc = center.reshape({K}).to(acc_type).contiguous();
  const at::Tensor s_stats_t = student_stats.to(acc_type).contiguous();
  const at::Tensor t_stats_t = teacher_stats.to(acc_type).contiguous();
  const Problem<acc_t> pb{B, K, V, G, static_cast<acc_t>(1.0 / teacher_temp), static_cast<acc_t>(1.0 / student_temp),
                          center_acc.data_ptr<acc_t>()};
  // The upstream gradient lives on the CPU, so reading it is no device sync.
  const double pair_count = static_cast<double>(G * (V - 1) * B);
  const acc_t scale = static_cast<acc_t>(grad_loss.item<double>() / (student_temp * pair_count));
  at::Tensor grad = grad_out.has_value() ? *grad_out : at::empty({V * B, K}, student.options());
  const int64_t ld = grad.stride(0);
  const scalar_t* s = student.data_ptr<scalar_t>();
  const scalar_t* t = teacher.data_ptr<scalar_t>();
  const acc_t* s_stats = s_stats_t.data_ptr<acc_t>();
  const acc_t* t_stats = t_stats_t.data_ptr<acc_t>();
  scalar_t* g = grad.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> q(static_cast<size_t>(G * K)), qsum(static_cast<size_t>(K)), tbuf(static_cast<size_t>(K)),
        sbuf(static_cast<size_t>(K)), obuf(static_cast<size_t>(K));
    for (int64_t b = b0; b < b1; ++b) {
      backward_sample_dispatch(pb, s, t, s_stats, t_stats, scale, b, q.data(), qsum.data(), tbuf.data(), sbuf.data(),
                               obuf.data(), g, ld);
    }
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dino_loss_fwd_cpu(const at::Tensor& student_in,
                                                                             const at::Tensor& teacher_in,
                                                                             const at::Tensor& center,
                                                                             int64_t ncrops, int64_t n_global,
                                                                             double teacher_temp,
                                                                             double student_temp) {
  const Shape shape = check_inputs("dino_fast_native::dino_loss_fwd", student_in, teacher_in, center, ncrops, n_global);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  switch (student.scalar_type()) {
    case at::kFloat:
      return forward_typed<float, float>(student, teacher, center, shape, ncrops, n_global, teacher_temp, student_temp);
    case at::kBFloat16:
      return forward_typed<c10::BFloat16, float>(student, teacher, center, shape, ncrops, n_global, teacher_temp,
                                                 student_temp);
    case at::kHalf:
      return forward_typed<c10::Half, float>(student, teacher, center, shape, ncrops, n_global, teacher_temp,
                                             student_temp);
    case at::kDouble:
      return forward_typed<double, double>(student, teacher, center, shape, ncrops, n_global, teacher_temp,
                                           student_temp);
    default:
      TORCH_CHECK(false, "dino_fast_native::dino_loss_fwd: unsupported dtype ", student.scalar_type(),
                  "; use fp32, bf16, fp16 or fp64");
  }
}

at::Tensor dino_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student_in, const at::Tensor& teacher_in,
                             const at::Tensor& center, const at::Tensor& student_stats,
                             const at::Tensor& teacher_stats,
                             int64_t ncrops, int64_t n_global, double teacher_temp, double student_temp,
                             const std::optional<at::Tensor>& grad_out) {
  const char* op = "dino_fast_native::dino_loss_bwd";
  const Shape shape = check_inputs(op, student_in, teacher_in, center, ncrops, n_global);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value, got shape ", grad_loss.sizes());
  TORCH_CHECK(student_stats.numel() == 2 * ncrops * shape.B && teacher_stats.numel() == 2 * n_global * shape.B, op,
              ": student_stats/teacher_stats must hold (max, log-sum) per student/teacher row, got ",
              student_stats.sizes(), " and ", teacher_stats.sizes());
  if (grad_out.has_value()) {
    const at::Tensor& out = *grad_out;
    TORCH_CHECK(out.sizes() == student_in.sizes() && out.scalar_type() == student_in.scalar_type() &&
                    out.device().is_cpu() && out.stride(1) == 1,
                op, ": grad_out must be a CPU ", student_in.scalar_type(), " tensor of shape ", student_in.sizes(),
                " with unit column stride, got ", out.scalar_type(), " ", out.sizes(), " strides ", out.strides());
  }
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  switch (student.scalar_type()) {
    case at::kFloat:
      return backward_typed<float, float>(grad_loss, student, teacher, center, student_stats, teacher_stats, shape,
                                          ncrops, n_global, teacher_temp, student_temp, grad_out);
    case at::kBFloat16:
      return backward_typed<c10::BFloat16, float>(grad_loss, student, teacher, center, student_stats, teacher_stats,
                                                  shape, ncrops, n_global, teacher_temp, student_temp, grad_out);
    case at::kHalf:
      return backward_typed<c10::Half, float>(grad_loss, student, teacher, center, student_stats, teacher_stats, shape,
                                              ncrops, n_global, teacher_temp, student_temp, grad_out);
    case at::kDouble:
      return backward_typed<double, double>(grad_loss, student, teacher, center, student_stats, teacher_stats, shape,
                                            ncrops, n_global, teacher_temp, student_temp, grad_out);
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", student.scalar_type(), "; use fp32, bf16, fp16 or fp64");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dino_fast_native, m) {
  m.def(
      "dino_loss_fwd(Tensor student, Tensor teacher, Tensor center, int ncrops, int n_global, float teacher_temp, "
      "float student_temp) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dino_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor center, Tensor student_stats, "
      "Tensor teacher_stats, int ncrops, int n_global, float teacher_temp, float student_temp, Tensor? grad_out=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(dino_fast_native, CPU, m) {
  m.impl("dino_loss_fwd", &dino_loss_fwd_cpu);
  m.impl("dino_loss_bwd", &dino_loss_bwd_cpu);
}
