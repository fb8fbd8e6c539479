// opad._C: the entry points. Each dispatches on the device of its tensors; a CUDA tensor in a build
// without CUDA is a clear error, never a silent copy to the CPU.
#include <torch/extension.h>

#include "feature_pass.h"

namespace opad {
namespace {

void check_images(const at::Tensor& images) {
  TORCH_CHECK(images.dim() == 4, "feature pass: images must be (B, C, H, W), got ", images.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(images.scalar_type()), "feature pass: images must be floating point, got ",
              images.scalar_type());
  TORCH_CHECK(images.numel() > 0, "feature pass: images are empty: ", images.sizes());
}

#ifndef WITH_CUDA
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "opad._C was built without CUDA, so it cannot take CUDA tensors; rebuild it where nvcc and a "
                     "CUDA build of torch are present (pip install --no-build-isolation -e .; FORCE_CUDA=1 insists)");
}
#endif

}  // namespace

std::vector<at::Tensor> feature_pass_forward(const at::Tensor& images, const std::vector<int64_t>& out_h,
                                             const std::vector<int64_t>& out_w, const std::vector<std::string>& modes,
                                             const std::vector<std::vector<double>>& scale,
                                             const std::vector<std::vector<double>>& bias) {
  check_images(images);
  const auto specs = make_specs(out_h, out_w, modes, scale, bias, images.size(1));
  if (images.is_cuda()) {
#ifdef WITH_CUDA
    return forward_cuda(images, specs);
#else
    no_cuda();
#endif
  }
  TORCH_CHECK(images.device().is_cpu(), "feature pass: no implementation for ", images.device().type(), " tensors");
  return forward_cpu(images, specs);
}

at::Tensor feature_pass_backward(const std::vector<at::Tensor>& grads, int64_t in_h, int64_t in_w,
                                 const std::vector<int64_t>& out_h, const std::vector<int64_t>& out_w,
                                 const std::vector<std::string>& modes, const std::vector<std::vector<double>>& scale,
                                 const std::vector<std::vector<double>>& bias) {
  TORCH_CHECK(!grads.empty(), "feature pass backward: no gradients");
  const at::Tensor& first = grads[0];
  const auto specs = make_specs(out_h, out_w, modes, scale, bias, first.size(1));
  TORCH_CHECK(grads.size() == specs.size(), "feature pass backward: ", grads.size(), " gradients for ", specs.size(),
              " inputs");
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& g = grads[k];
    TORCH_CHECK(g.dim() == 4 && g.size(0) == first.size(0) && g.size(1) == first.size(1) &&
                    g.size(2) == specs[k].out_h && g.size(3) == specs[k].out_w,
                "feature pass backward: gradient ", k, " has shape ", g.sizes(), ", expected (", first.size(0), ", ",
                first.size(1), ", ", specs[k].out_h, ", ", specs[k].out_w, ")");
    TORCH_CHECK(g.scalar_type() == first.scalar_type() && g.device() == first.device(),
                "feature pass backward: gradients differ in dtype or device");
  }
  if (first.is_cuda()) {
#ifdef WITH_CUDA
    return backward_cuda(grads, specs, in_h, in_w);
#else
    no_cuda();
#endif
  }
  return backward_cpu(grads, specs, in_h, in_w);
}

bool cuda_built() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace opad

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "opad's compiled ops: the fused multi-backbone feature pass (CPU and, when built with it, CUDA)";
  m.def("feature_pass_forward", &opad::feature_pass_forward, "images -> K resized, normalised backbone inputs",
        py::arg("images"), py::arg("out_h"), py::arg("out_w"), py::arg("modes"), py::arg("scale"), py::arg("bias"));
  m.def("feature_pass_backward", &opad::feature_pass_backward, "K input gradients -> the summed image gradient",
        py::arg("grads"), py::arg("in_h"), py::arg("in_w"), py::arg("out_h"), py::arg("out_w"), py::arg("modes"),
        py::arg("scale"), py::arg("bias"));
  m.def("cuda_built", &opad::cuda_built, "whether this build has the CUDA kernels");
}
