// Fused multi-tensor teacher EMA, teacher <- m * teacher + (1 - m) * student over whole parameter
// lists: the op schema, the input checks shared with ema_cuda.cu, and the CPU kernel.
//
//   torch.ops.dino_fast_native.ema_update_(teacher: list[Tensor], student: list[Tensor],
//                                          momentum_tensor: Tensor | None, momentum: float) -> None
//
// A one-element momentum_tensor wins over the float (a device tensor keeps the CUDA kernels free of
// host syncs and capturable in a CUDA graph); the float is read otherwise.
//
// Math, per element, with C = double for fp64 teachers and float otherwise (dino_fast.ops.reference's
// compute dtype):
//
//   t' = round_T( C(t) * m_C + C(s) * w_C )
//   m_C = C(momentum),  w_C = C(1 - momentum) evaluated in double   (float momentum)
//   m_C = C(tensor),    w_C = 1 - m_C evaluated in C                 (tensor momentum)
//
// which is how the reference rounds both factors. Whether or not the compiler contracts the
// expression into an FMA, m = 1 returns t and m = 0 returns round_T(s) bit-exactly for finite
// inputs (t*1 + s*0 and t*0 + s*1 are exact). Each element is read once from t and s and written
// once to t, so the kernel is a pure stream: the CPU version splits every tensor into fixed-size
// chunks and runs all chunks of all tensors in one OpenMP region, instead of one parallel region
// (and one dispatcher round trip) per tensor as a per-parameter loop or torch._foreach_lerp_ on CPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#ifdef DINO_FAST_WITH_OPENMP
#include <omp.h>
#endif

namespace dino_fast {

// Used by ema_cuda.cu too: every check that does not depend on the device.
void ema_check_inputs(at::TensorList teacher, at::TensorList student,
                      const std::optional<at::Tensor>& momentum_tensor) {
  TORCH_CHECK(teacher.size() == student.size(), "ema_update_: got ", teacher.size(),
              " teacher tensors but ", student.size(),
              " student tensors; pass the two parameter lists in matching order");
  if (teacher.empty()) return;
  const c10::Device device = teacher[0].device();
  auto supported = [](at::ScalarType type) {
    return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
  };
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK(t.defined() && s.defined(), "ema_update_: pair ", i, " holds an undefined tensor");
    TORCH_CHECK(t.device() == device && s.device() == device, "ema_update_: pair ", i,
                " has its teacher on ", t.device(), " and its student on ", s.device(),
                " but pair 0's teacher is on ", device, "; move all parameters to one device");
    TORCH_CHECK(supported(t.scalar_type()) && supported(s.scalar_type()), "ema_update_: pair ", i,
                " has dtypes ", t.scalar_type(), " (teacher) and ", s.scalar_type(),
                " (student); supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.sizes() == s.sizes(), "ema_update_: pair ", i, ": teacher shape ", t.sizes(),
                " differs from student shape ", s.sizes());
    TORCH_CHECK(t.is_contiguous() && s.is_contiguous(), "ema_update_: pair ", i,
                " is not contiguous (teacher strides ", t.strides(), ", student strides ", s.strides(),
                "); the fused kernels stream memory linearly: pass contiguous tensors, or call "
                "dino_fast.ops.ema_update_, which routes non-contiguous pairs through the reference path");
  }
  if (momentum_tensor.has_value()) {
    const at::Tensor& m = *momentum_tensor;
    TORCH_CHECK(m.numel() == 1 && m.is_floating_point(),
                "ema_update_: momentum_tensor must be a floating tensor with one element, got ",
                m.scalar_type(), " of shape ", m.sizes());
    TORCH_CHECK(m.device().is_cpu() || m.device() == device, "ema_update_: momentum_tensor is on ",
                m.device(), " but the parameters are on ", device,
                "; keep it on the parameters' device (or on the CPU)");
  }
}

namespace {

// Elements per work item: 64 KiB of fp32 per stream, large enough to amortize the scheduling and
// small enough that a 2-thread split of a 44M-element model stays balanced to well under 1%.
constexpr int64_t kChunk = 16384;
// Below this many elements in total a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 65536;

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Momentum {
  float m_f, w_f;
  double m_d, w_d;
  template <typename C>
  C m() const {
    if constexpr (std::is_same_v<C, double>) return m_d; else return m_f;
  }
  template <typename C>
  C w() const {
    if constexpr (std::is_same_v<C, double>) return w_d; else return w_f;
  }
};

#if defined(__GNUC__)
#define DF_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define DF_ALWAYS_INLINE inline
#endif

template <typename T, typename S>
DF_ALWAYS_INLINE void ema_span(void* t_raw, const void* s_raw, int64_t n, const Momentum& mo) {
  using C = compute_t<T>;
  T* __restrict t = static_cast<T*>(t_raw);
  const S* __restrict s = static_cast<const S*>(s_raw);
  const C m = mo.m<C>();
  const C w = mo.w<C>();
  for (int64_t i = 0; i < n; ++i) {
    t[i] = static_cast<T>(static_cast<C>(t[i]) * m + static_cast<C>(s[i]) * w);
  }
}

using SpanFn = void (*)(void*, const void*, int64_t, const Momentum&);

// The same loop compiled three times: for the x86-64 baseline the build targets (no -march=native,
// the wheel must run anywhere), and for AVX2 and AVX-512, picked at run time. Wide vectors pay
// only where there is arithmetic to do, i.e. bf16/fp16 conversions (measured on a Zen 4 EPYC, one
// thread, ViT-S/16 + head: bf16 with AVX-512 1.2x torch._foreach_lerp_, with SSE2 0.4x). fp32/fp64
// pairs are a pure memory stream that 16-byte vectors already saturate, and there the 64-byte ones
// measured ~10% slower (Zen 4 splits them), so those pairs keep the baseline loop.
template <typename T, typename S>
void span_baseline(void* t, const void* s, int64_t n, const Momentum& mo) {
  ema_span<T, S>(t, s, n, mo);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DF_HAVE_ISA_VARIANTS 1
template <typename T, typename S>
__attribute__((target("avx2,fma,f16c"))) void span_avx2(void* t, const void* s, int64_t n,
                                                        const Momentum& mo) {
  ema_span<T, S>(t, s, n, mo);
}
template <typename T, typename S>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void span_avx512(void* t, const void* s,
                                                                                    int64_t n,
                                                                                    const Momentum& mo) {
  ema_span<T, S>(t, s, n, mo);
}
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef DF_HAVE_ISA_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

template <typename T, typename S>
SpanFn span_for(Isa isa) {
  constexpr bool converts = !(std::is_floating_point_v<T> && std::is_floating_point_v<S>);
#ifdef DF_HAVE_ISA_VARIANTS
  if (converts && isa == Isa::kAvx512) return &span_avx512<T, S>;
  if (converts && isa == Isa::kAvx2) return &span_avx2<T, S>;
#endif
  (void)isa;
  (void)converts;
  return &span_baseline<T, S>;
}

template <typename T>
SpanFn span_for_student(at::ScalarType student, Isa isa) {
  switch (student) {
    case at::kFloat: return span_for<T, float>(isa);
    case at::kDouble: return span_for<T, double>(isa);
    case at::kHalf: return span_for<T, c10::Half>(isa);
    case at::kBFloat16: return span_for<T, c10::BFloat16>(isa);
    default: TORCH_CHECK(false, "ema_update_: unsupported student dtype ", student);
  }
}

SpanFn span_for_pair(at::ScalarType teacher, at::ScalarType student) {
  static const Isa isa = detect_isa();
  switch (teacher) {
    case at::kFloat: return span_for_student<float>(student, isa);
    case at::kDouble: return span_for_student<double>(student, isa);
    case at::kHalf: return span_for_student<c10::Half>(student, isa);
    case at::kBFloat16: return span_for_student<c10::BFloat16>(student, isa);
    default: TORCH_CHECK(false, "ema_update_: unsupported teacher dtype ", teacher);
  }
}

Momentum momentum_values(const std::optional<at::Tensor>& momentum_tensor, double momentum) {
  Momentum mo{};
  if (momentum_tensor.has_value()) {
    TORCH_CHECK(momentum_tensor->device().is_cpu(), "ema_update_: momentum_tensor is on ",
                momentum_tensor->device(), " but the parameters are on the CPU");
    // Every floating dtype converts to double exactly, so these roundings match tensor.to(C).
    const double value = momentum_tensor->item<double>();
    mo.m_f = static_cast<float>(value);
    mo.w_f = 1.0f - mo.m_f;
    mo.m_d = value;
    mo.w_d = 1.0 - value;
  } else {
    mo.m_f = static_cast<float>(momentum);
    mo.w_f = static_cast<float>(1.0 - momentum);
    mo.m_d = momentum;
    mo.w_d = 1.0 - momentum;
  }
  return mo;
}

struct Chunk {
  void* teacher;
  const void* student;
  int64_t numel;
  SpanFn fn;
};

void ema_update_cpu(at::TensorList teacher, at::TensorList student,
                    const std::optional<at::Tensor>& momentum_tensor, double momentum) {
  ema_check_inputs(teacher, student, momentum_tensor);
  if (teacher.empty()) return;
  TORCH_CHECK(teacher[0].device().is_cpu(), "ema_update_ (CPU kernel): parameters are on ",
              teacher[0].device());
  const Momentum mo = momentum_values(momentum_tensor, momentum);

  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const int64_t n = teacher[i].numel();
    if (n == 0) continue;
    total += n;
    const SpanFn fn = span_for_pair(teacher[i].scalar_type(), student[i].scalar_type());
    char* t = static_cast<char*>(teacher[i].data_ptr());
    const char* s = static_cast<const char*>(student[i].data_ptr());
    const int64_t t_size = teacher[i].element_size();
    const int64_t s_size = student[i].element_size();
    for (int64_t start = 0; start < n; start += kChunk) {
      chunks.push_back({t + start * t_size, s + start * s_size, std::min(kChunk, n - start), fn});
    }
  }
  const int64_t count = static_cast<int64_t>(chunks.size());

#ifdef DINO_FAST_WITH_OPENMP
  // torch's intra-op thread count (torch.set_num_threads) bounds ours; never nest inside a
  // parallel region that is already running (at::parallel_for, a DataLoader worker's OpenMP, ...).
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), count));
  if (total >= kParallelMin && threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < count; ++c) {
      chunks[c].fn(chunks[c].teacher, chunks[c].student, chunks[c].numel, mo);
    }
    return;
  }
#endif
  for (int64_t c = 0; c < count; ++c) {
    chunks[c].fn(chunks[c].teacher, chunks[c].student, chunks[c].numel, mo);
  }
}

// Checks only: lets FakeTensor tracing (torch.compile, torch.export) run through the op, which
// mutates its teacher list in place and returns nothing.
void ema_update_meta(at::TensorList teacher, at::TensorList student,
                     const std::optional<at::Tensor>& momentum_tensor, double /*momentum*/) {
  ema_check_inputs(teacher, student, momentum_tensor);
}

}  // namespace
}  // namespace dino_fast

TORCH_LIBRARY_FRAGMENT(dino_fast_native, m) {
  m.def(
      "ema_update_(Tensor(a!)[] teacher, Tensor[] student, Tensor? momentum_tensor, float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(dino_fast_native, CPU, m) {
  m.impl("ema_update_", &dino_fast::ema_update_cpu);
}

TORCH_LIBRARY_IMPL(dino_fast_native, Meta, m) {
  m.impl("ema_update_", &dino_fast::ema_update_meta);
}
