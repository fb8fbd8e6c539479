// The fused multi-backbone feature pass: one image -> K resized, normalised backbone inputs, and
// back: K input gradients -> one summed image gradient.
//
// Every resize mode is separable: output o of an axis reads `count[o]` consecutive input pixels
// from `start[o]` with `weight[o * taps + t]`. The same tables transposed say, for each input
// pixel, which outputs read it: the backward gathers through them, so each gradient pixel is
// written once, with no atomics (deterministic) and all K backbones summed in registers.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace opad {

enum class Resize { Antialias, Area, Bilinear };

Resize parse_resize(const std::string& name);

struct AxisTable {
  int64_t taps = 0;              // the widest window; shorter ones are zero-padded
  std::vector<int64_t> start;    // per output index
  std::vector<int64_t> count;    // per output index, <= taps
  std::vector<double> weight;    // [out * taps]
};

// What torch.nn.functional.interpolate computes along one axis (align_corners=False):
// antialias = bilinear with antialias=True, area = adaptive average pooling, bilinear = 2 taps.
AxisTable resize_table(int64_t in, int64_t out, Resize mode);

// For each of the `in` input indices: the consecutive outputs that read it and with what weight.
AxisTable transpose_table(const AxisTable& table, int64_t in);

// One backbone input: its size, resize mode and per-channel affine map y = scale * resize(x) + bias
// ((x - mean) / std is scale = 1 / std, bias = -mean / std; the raw [-1, 1] input is 2, -1).
struct Spec {
  int64_t out_h, out_w;
  Resize mode;
  std::vector<double> scale, bias;  // one per channel
};

std::vector<Spec> make_specs(const std::vector<int64_t>& out_h, const std::vector<int64_t>& out_w,
                             const std::vector<std::string>& modes, const std::vector<std::vector<double>>& scale,
                             const std::vector<std::vector<double>>& bias, int64_t channels);

// The four tables of one spec on an (in_h, in_w) image.
struct SpecTables {
  AxisTable y, x, y_t, x_t;  // forward rows / columns and their transposes
};
SpecTables spec_tables(const Spec& spec, int64_t in_h, int64_t in_w);

std::vector<at::Tensor> forward_cpu(const at::Tensor& images, const std::vector<Spec>& specs);
at::Tensor backward_cpu(const std::vector<at::Tensor>& grads, const std::vector<Spec>& specs, int64_t in_h,
                        int64_t in_w);
#ifdef WITH_CUDA
std::vector<at::Tensor> forward_cuda(const at::Tensor& images, const std::vector<Spec>& specs);
at::Tensor backward_cuda(const std::vector<at::Tensor>& grads, const std::vector<Spec>& specs, int64_t in_h,
                         int64_t in_w);
#endif

}  // namespace opad
