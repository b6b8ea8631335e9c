// dino_fast._C: the Python module. Kernels register themselves as torch ops in their own
// files (TORCH_LIBRARY_FRAGMENT(dino_fast_native, m) + TORCH_LIBRARY_IMPL per device);
// loading this module is what makes them visible as torch.ops.dino_fast_native.*.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace py = pybind11;

namespace {

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::string current;
  for (char c : text) {
    if (c == ',') {
      if (!current.empty()) parts.push_back(current);
      current.clear();
    } else {
      current.push_back(c);
    }
  }
  if (!current.empty()) parts.push_back(current);
  return parts;
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::string(DINO_FAST_TORCH_VERSION);
#ifdef DINO_FAST_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef DINO_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = split_commas(DINO_FAST_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::vector<std::string>{};
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dino_fast native kernels (C++/OpenMP on CPU, CUDA where built)";
  m.def("build_info", &build_info,
        "How this extension was built: torch_version, openmp, cuda, cuda_archs.");
}
