// Stand-ins for the CUDA entry points when the module is built without CUDA (EMOVEC_CUDA=0 or no nvcc).
#include "steer_project.h"

namespace emovec {

void steer_project_cuda(const SteerProjectArgs&, std::intptr_t) {
  throw std::runtime_error(
      "emovec was built without CUDA kernels (nvcc was not found or EMOVEC_CUDA=0); rebuild with nvcc on PATH "
      "and EMOVEC_CUDA=1: pip install -e . --no-build-isolation");
}
bool cuda_compiled() { return false; }
std::string cuda_architectures() { return ""; }
int cuda_device_count() { return 0; }

}  // namespace emovec
