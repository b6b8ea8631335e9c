// CUDA kernels for dino_fast_native::ema_update_ (schema, input checks and the math in ema.cpp):
// teacher <- m * teacher + (1 - m) * student over lists of tensors, in fp32 (fp64 for fp64
// teachers) with one rounding to the teacher's dtype.
//
// Launch structure, per (teacher dtype, student dtype) group of the list:
// - one pair (the flat buffers of TeacherEMA(flat=True, pack_student=True)): a grid-stride stream,
//   16-byte vector accesses, a few blocks per SM, so the GPU streams at copy bandwidth;
// - several pairs: apex-style multi_tensor_apply. The pairs are cut into chunks of kChunk elements;
//   each launch carries, by value in its kernel parameters, up to kMaxTensors pointer pairs and a
//   block -> (tensor slot, chunk) map for up to kMaxBlocks blocks, so nothing is copied to the
//   device first and the launch sequence is capturable in a CUDA graph. A 44M-parameter ViT-S/16 +
//   DINO head in 158 tensors takes 3 launches instead of 158.
//
// Momentum: a float (baked into the launch) or a one-element tensor on the device that every block
// reads itself, so a changing momentum needs neither a host sync nor a new graph.
//
// Only c10's CUDA headers are used: ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE
// headers, which a bare CUDA toolkit (nvcc + cudart) does not ship.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <utility>
#include <vector>

namespace dino_fast {

// Defined in ema.cpp.
void ema_check_inputs(at::TensorList teacher, at::TensorList student,
                      const std::optional<at::Tensor>& momentum_tensor);

namespace {

constexpr int kThreads = 512;
constexpr int kMinBlocksPerSm = 2;  // caps registers at 64 per thread: 2048 resident threads per SM
constexpr int64_t kChunk = 65536;  // elements per block in a multi-tensor launch
constexpr int kMaxTensors = 96;
constexpr int kMaxBlocks = 320;

// Kernel parameters are limited to 4 KiB on every architecture and CUDA version we build for.
struct TensorListArgs {
  void* teacher[kMaxTensors];
  const void* student[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};

enum MomentumKind : int { kScalar = 0, kHostTensor = 1, kFloatPtr = 2, kDoublePtr = 3 };

struct MomentumArgs {
  const void* ptr;  // kFloatPtr / kDoublePtr: a device scalar
  double m;         // kScalar: m; kHostTensor: the tensor's value
  double w;         // kScalar: 1 - m evaluated in double, as the reference does for a Python float
  int kind;
};

static_assert(sizeof(TensorListArgs) + sizeof(MomentumArgs) <= 4000,
              "multi-tensor launch arguments must fit CUDA's 4 KiB kernel parameter space");

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename C>
__device__ __forceinline__ void momentum_values(const MomentumArgs& a, C& m, C& w) {
  if (a.kind == kScalar) {
    m = static_cast<C>(a.m);
    w = static_cast<C>(a.w);
    return;
  }
  if (a.kind == kHostTensor) {
    m = static_cast<C>(a.m);
  } else if (a.kind == kFloatPtr) {
    m = static_cast<C>(__ldg(static_cast<const float*>(a.ptr)));
  } else {
    m = static_cast<C>(__ldg(static_cast<const double*>(a.ptr)));
  }
  w = C(1) - m;  // a tensor momentum: the reference evaluates 1 - m in the compute dtype
}

// As many elements per vector as make the narrower of the two dtypes one 16-byte access.
template <typename T, typename S>
constexpr int vec_width() {
  return static_cast<int>(16 / std::min(sizeof(T), sizeof(S)));
}

// Vectors loaded per thread before any is used: 4 x 16 bytes per stream keeps enough bytes in
// flight per SM for HBM; with 8-wide vectors (a 16-bit dtype beside a wider one) 2 do the same
// and keep the kernel within the 64-register budget of kMinBlocksPerSm.
template <typename T, typename S>
constexpr int unroll() {
  return vec_width<T, S>() >= 8 ? 2 : 4;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, typename S, typename C>
__device__ __forceinline__ T ema_one(T t, S s, C m, C w) {
  return static_cast<T>(static_cast<C>(t) * m + static_cast<C>(s) * w);
}

// Elements [0, n) of t/s, split over `lanes` threads of which this is `lane`.
template <typename T, typename S, typename C>
__device__ __forceinline__ void ema_range(T* __restrict__ t, const S* __restrict__ s, int64_t n, C m, C w,
                                          int64_t lane, int64_t lanes) {
  constexpr int N = vec_width<T, S>();
  constexpr int kUnroll = unroll<T, S>();
  using VT = Vec<T, N>;
  using VS = Vec<S, N>;
  const bool aligned = reinterpret_cast<uintptr_t>(t) % sizeof(VT) == 0 &&
                       reinterpret_cast<uintptr_t>(s) % sizeof(VS) == 0;
  int64_t vectorized = 0;
  if (aligned) {
    const int64_t nvec = n / N;
    VT* tv = reinterpret_cast<VT*>(t);
    const VS* sv = reinterpret_cast<const VS*>(s);
    for (int64_t base = lane; base < nvec; base += lanes * kUnroll) {
      VT a[kUnroll];
      VS b[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * lanes;
        if (i < nvec) {
          a[u] = tv[i];
          b[u] = sv[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * lanes;
        if (i < nvec) {
#pragma unroll
          for (int k = 0; k < N; ++k) a[u].v[k] = ema_one<T, S, C>(a[u].v[k], b[u].v[k], m, w);
          tv[i] = a[u];
        }
      }
    }
    vectorized = nvec * N;
  }
  for (int64_t i = vectorized + lane; i < n; i += lanes) t[i] = ema_one<T, S, C>(t[i], s[i], m, w);
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) ema_flat_kernel(T* t, const S* s, int64_t n, MomentumArgs mo) {
  using C = compute_t<T>;
  C m, w;
  momentum_values(mo, m, w);
  ema_range<T, S, C>(t, s, n, m, w, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                     static_cast<int64_t>(gridDim.x) * blockDim.x);
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) ema_multi_tensor_kernel(TensorListArgs list, MomentumArgs mo) {
  using C = compute_t<T>;
  C m, w;
  momentum_values(mo, m, w);
  const int slot = list.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(list.block_chunk[blockIdx.x]) * kChunk;
  const int64_t left = list.numel[slot] - start;
  const int64_t n = left < kChunk ? left : kChunk;  // not std::min: it would bind kChunk by reference
  T* t = static_cast<T*>(list.teacher[slot]) + start;
  const S* s = static_cast<const S*>(list.student[slot]) + start;
  ema_range<T, S, C>(t, s, n, m, w, threadIdx.x, blockDim.x);
}

template <typename T, typename S>
void launch_flat(const at::Tensor& teacher, const at::Tensor& student, const MomentumArgs& mo,
                 cudaStream_t stream) {
  const int64_t n = teacher.numel();
  if (n == 0) return;
  constexpr int64_t per_block = static_cast<int64_t>(kThreads) * vec_width<T, S>() * unroll<T, S>();
  // One wave of resident blocks (more would only queue), each thread striding over the rest.
  static const int resident_per_sm = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, ema_flat_kernel<T, S>, kThreads, 0));
    return std::max(blocks, 1);
  }();
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (n + per_block - 1) / per_block;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 1LL * sms * resident_per_sm)));
  ema_flat_kernel<T, S><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(teacher.data_ptr()),
                                                         static_cast<const S*>(student.data_ptr()), n, mo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename S>
void launch_multi_tensor(at::TensorList teacher, at::TensorList student, const std::vector<int64_t>& pairs,
                         const MomentumArgs& mo, cudaStream_t stream) {
  TensorListArgs list;
  int slot = 0;
  int blocks = 0;
  auto launch = [&]() {
    ema_multi_tensor_kernel<T, S><<<blocks, kThreads, 0, stream>>>(list, mo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks = 0;
  };
  for (const int64_t index : pairs) {
    const int64_t n = teacher[index].numel();
    if (n == 0) continue;
    list.teacher[slot] = teacher[index].data_ptr();
    list.student[slot] = student[index].data_ptr();
    list.numel[slot] = n;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      list.block_tensor[blocks] = static_cast<uint8_t>(slot);
      list.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk + 1 == chunks;
      if (blocks == kMaxBlocks || (slot + 1 == kMaxTensors && last_chunk)) {
        launch();
        if (last_chunk) {
          slot = -1;  // the next tensor starts the next launch at slot 0
        } else {
          // The rest of this tensor's chunks continue in the next launch, from slot 0.
          list.teacher[0] = list.teacher[slot];
          list.student[0] = list.student[slot];
          list.numel[0] = list.numel[slot];
          slot = 0;
        }
      }
    }
    ++slot;
  }
  if (blocks > 0) launch();
}

template <typename T, typename S>
void launch_group(at::TensorList teacher, at::TensorList student, const std::vector<int64_t>& pairs,
                  const MomentumArgs& mo, cudaStream_t stream) {
  if (pairs.size() == 1) {
    launch_flat<T, S>(teacher[pairs[0]], student[pairs[0]], mo, stream);
  } else {
    launch_multi_tensor<T, S>(teacher, student, pairs, mo, stream);
  }
}

template <typename T>
void dispatch_student(at::ScalarType student_type, at::TensorList teacher, at::TensorList student,
                      const std::vector<int64_t>& pairs, const MomentumArgs& mo, cudaStream_t stream) {
  switch (student_type) {
    case at::kFloat: return launch_group<T, float>(teacher, student, pairs, mo, stream);
    case at::kDouble: return launch_group<T, double>(teacher, student, pairs, mo, stream);
    case at::kHalf: return launch_group<T, c10::Half>(teacher, student, pairs, mo, stream);
    case at::kBFloat16: return launch_group<T, c10::BFloat16>(teacher, student, pairs, mo, stream);
    default: TORCH_CHECK(false, "ema_update_: unsupported student dtype ", student_type);
  }
}

void ema_update_cuda(at::TensorList teacher, at::TensorList student,
                     const std::optional<at::Tensor>& momentum_tensor, double momentum) {
  ema_check_inputs(teacher, student, momentum_tensor);
  if (teacher.empty()) return;
  const c10::Device device = teacher[0].device();
  TORCH_CHECK(device.is_cuda(), "ema_update_ (CUDA kernel): parameters are on ", device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());

  MomentumArgs mo{nullptr, momentum, 1.0 - momentum, kScalar};
  at::Tensor momentum_on_device;  // keeps a converted momentum alive until the launches are queued
  if (momentum_tensor.has_value()) {
    const at::Tensor& m = *momentum_tensor;
    if (m.device().is_cpu()) {
      mo = {nullptr, m.item<double>(), 0.0, kHostTensor};  // a CPU read: never waits for the GPU
    } else {
      // fp16/bf16 momenta are widened on the stream (exactly), still without a host sync.
      momentum_on_device = m.scalar_type() == at::kDouble ? m : m.to(at::kFloat);
      mo = {momentum_on_device.data_ptr(), 0.0, 0.0,
            momentum_on_device.scalar_type() == at::kDouble ? kDoublePtr : kFloatPtr};
    }
  }

  // One launch sequence per dtype pair; pairs keep their list order inside a group.
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<int64_t>> groups;
  for (size_t i = 0; i < teacher.size(); ++i) {
    groups[{teacher[i].scalar_type(), student[i].scalar_type()}].push_back(static_cast<int64_t>(i));
  }
  for (const auto& [types, pairs] : groups) {
    switch (types.first) {
      case at::kFloat: dispatch_student<float>(types.second, teacher, student, pairs, mo, stream); break;
      case at::kDouble: dispatch_student<double>(types.second, teacher, student, pairs, mo, stream); break;
      case at::kHalf: dispatch_student<c10::Half>(types.second, teacher, student, pairs, mo, stream); break;
      case at::kBFloat16:
        dispatch_student<c10::BFloat16>(types.second, teacher, student, pairs, mo, stream);
        break;
      default: TORCH_CHECK(false, "ema_update_: unsupported teacher dtype ", types.first);
    }
  }
}

}  // namespace
}  // namespace dino_fast

TORCH_LIBRARY_IMPL(dino_fast_native, CUDA, m) {
  m.impl("ema_update_", &dino_fast::ema_update_cuda);
}
