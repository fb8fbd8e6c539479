// Resize weight tables, shared by the CPU and CUDA implementations (computed once per call on the
// host, in double). The formulas are torch's own definitions of each mode, so the fused pass
// agrees with F.interpolate to rounding.
#include "feature_pass.h"

#include <algorithm>
#include <cmath>

namespace opad {

Resize parse_resize(const std::string& name) {
  if (name == "antialias") return Resize::Antialias;
  if (name == "area") return Resize::Area;
  if (name == "bilinear") return Resize::Bilinear;
  TORCH_CHECK(false, "unknown resize mode '", name, "'; choose from antialias, area, bilinear");
}

namespace {

struct Window {
  int64_t start;
  std::vector<double> weight;
};

// Bilinear with antialiasing: a triangle filter stretched by the scale when shrinking, weights
// normalised over the taps inside the image (torch's _upsample_bilinear2d_aa).
Window antialias_window(int64_t o, int64_t in, double scale) {
  const double support = scale >= 1.0 ? scale : 1.0;
  const double inv = scale >= 1.0 ? 1.0 / scale : 1.0;
  const double center = scale * (o + 0.5);
  const int64_t lo = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
  const int64_t hi = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in);
  Window w{lo, {}};
  double total = 0.0;
  for (int64_t p = lo; p < hi; ++p) {
    const double d = std::abs((p - center + 0.5) * inv);
    w.weight.push_back(d < 1.0 ? 1.0 - d : 0.0);
    total += w.weight.back();
  }
  if (total != 0.0)
    for (double& v : w.weight) v /= total;
  return w;
}

// Adaptive average pooling: the mean of input [floor(o*in/out), ceil((o+1)*in/out)).
Window area_window(int64_t o, int64_t in, int64_t out) {
  const int64_t lo = (o * in) / out;
  const int64_t hi = ((o + 1) * in + out - 1) / out;
  return {lo, std::vector<double>(hi - lo, 1.0 / static_cast<double>(hi - lo))};
}

// Plain bilinear (align_corners=False): two taps around (o + 0.5) * scale - 0.5, clamped at 0.
Window bilinear_window(int64_t o, int64_t in, double scale) {
  const double src = std::max(scale * (o + 0.5) - 0.5, 0.0);
  const int64_t i0 = static_cast<int64_t>(src);
  const double frac = src - static_cast<double>(i0);
  if (i0 >= in - 1) return {in - 1, {1.0}};
  return {i0, {1.0 - frac, frac}};
}

}  // namespace

AxisTable resize_table(int64_t in, int64_t out, Resize mode) {
  TORCH_CHECK(in > 0 && out > 0, "resize sizes must be positive, got ", in, " -> ", out);
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  std::vector<Window> windows;
  windows.reserve(out);
  for (int64_t o = 0; o < out; ++o) {
    switch (mode) {
      case Resize::Antialias: windows.push_back(antialias_window(o, in, scale)); break;
      case Resize::Area: windows.push_back(area_window(o, in, out)); break;
      case Resize::Bilinear: windows.push_back(bilinear_window(o, in, scale)); break;
    }
  }
  AxisTable t;
  for (const Window& w : windows) t.taps = std::max<int64_t>(t.taps, w.weight.size());
  t.weight.assign(out * t.taps, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    t.start.push_back(windows[o].start);
    t.count.push_back(windows[o].weight.size());
    std::copy(windows[o].weight.begin(), windows[o].weight.end(), t.weight.begin() + o * t.taps);
  }
  return t;
}

AxisTable transpose_table(const AxisTable& table, int64_t in) {
  const int64_t out = table.start.size();
  std::vector<int64_t> first(in, -1), last(in, -2);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < table.count[o]; ++k) {
      const int64_t p = table.start[o] + k;
      if (first[p] < 0) first[p] = o;
      last[p] = o;  // windows move forward with o, so the outputs reading p are consecutive
    }
  AxisTable t;
  for (int64_t p = 0; p < in; ++p) t.taps = std::max<int64_t>(t.taps, last[p] - first[p] + 1);
  t.weight.assign(in * t.taps, 0.0);
  for (int64_t p = 0; p < in; ++p) {
    t.start.push_back(first[p] < 0 ? 0 : first[p]);
    t.count.push_back(first[p] < 0 ? 0 : last[p] - first[p] + 1);
  }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < table.count[o]; ++k) {
      const int64_t p = table.start[o] + k;
      t.weight[p * t.taps + (o - t.start[p])] = table.weight[o * table.taps + k];
    }
  return t;
}

std::vector<Spec> make_specs(const std::vector<int64_t>& out_h, const std::vector<int64_t>& out_w,
                             const std::vector<std::string>& modes, const std::vector<std::vector<double>>& scale,
                             const std::vector<std::vector<double>>& bias, int64_t channels) {
  const size_t k = out_h.size();
  TORCH_CHECK(k > 0, "feature pass: no backbone inputs asked for");
  TORCH_CHECK(out_w.size() == k && modes.size() == k && scale.size() == k && bias.size() == k,
              "feature pass: sizes, modes, scales and biases must be given for each of the ", k, " inputs");
  std::vector<Spec> specs;
  for (size_t i = 0; i < k; ++i) {
    TORCH_CHECK(out_h[i] > 0 && out_w[i] > 0, "feature pass: output size must be positive, got ", out_h[i], "x",
                out_w[i]);
    TORCH_CHECK(static_cast<int64_t>(scale[i].size()) == channels && static_cast<int64_t>(bias[i].size()) == channels,
                "feature pass: input ", i, " needs one scale and bias per channel (", channels, ")");
    specs.push_back({out_h[i], out_w[i], parse_resize(modes[i]), scale[i], bias[i]});
  }
  return specs;
}

SpecTables spec_tables(const Spec& spec, int64_t in_h, int64_t in_w) {
  SpecTables t;
  t.y = resize_table(in_h, spec.out_h, spec.mode);
  t.x = resize_table(in_w, spec.out_w, spec.mode);
  t.y_t = transpose_table(t.y, in_h);
  t.x_t = transpose_table(t.x, in_w);
  return t;
}

}  // namespace opad
