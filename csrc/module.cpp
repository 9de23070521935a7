// The Python module smartfrz_fast._C. Loading it registers the smartfrz_ext ops (their
// TORCH_LIBRARY blocks are static initialisers in this shared library); build_info() says how
// it was built. Only pybind11 here: this translation unit stays light.

#include <pybind11/pybind11.h>

#include <string>
#include <vector>

namespace smartfrz {
std::vector<std::string> registered_ops();  // gather_history.cpp
}

#ifndef SMARTFRZ_TORCH_VERSION
#error "SMARTFRZ_TORCH_VERSION must be defined by the build (torch.__version__ at build time)"
#endif
#ifndef SMARTFRZ_COMPILER
#define SMARTFRZ_COMPILER "unknown"
#endif
#ifndef SMARTFRZ_CUDA_VERSION
#define SMARTFRZ_CUDA_VERSION ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled kernels of smartfrz_fast (ops in the torch.ops.smartfrz_ext namespace).";
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["torch_version"] = std::string(SMARTFRZ_TORCH_VERSION);
#ifdef SMARTFRZ_WITH_CUDA
        info["cuda"] = true;
        info["cuda_version"] = std::string(SMARTFRZ_CUDA_VERSION);
#else
        info["cuda"] = false;
        info["cuda_version"] = std::string("");
#endif
        info["compiler"] = std::string(SMARTFRZ_COMPILER);
        py::list ops;
        for (const auto& name : smartfrz::registered_ops()) {
          ops.append(name);
        }
        info["ops"] = ops;
        return info;
      },
      "How this extension was built: torch_version, cuda, cuda_version, compiler, ops.");
}
