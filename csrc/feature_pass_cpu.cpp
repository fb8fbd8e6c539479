// CPU implementation: one task per (image, channel) plane (ATen parallel_for). A plane is read once
// while it is in cache and all K inputs are made from it; each separable pass runs its long loop
// over contiguous memory (rows of the plane), the short tap loops inside.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "feature_pass.h"

namespace opad {
namespace {

template <typename acc_t>
struct Axis {  // an AxisTable with weights in the accumulation type
  int64_t taps;
  const int64_t* start;
  const int64_t* count;
  std::vector<acc_t> weight;
  explicit Axis(const AxisTable& t)
      : taps(t.taps), start(t.start.data()), count(t.count.data()), weight(t.weight.begin(), t.weight.end()) {}
};

template <typename scalar_t, typename acc_t>
void resize_plane(const scalar_t* in, int64_t w_in, const Axis<acc_t>& ay, const Axis<acc_t>& ax, int64_t out_h,
                  int64_t out_w, acc_t scale, acc_t bias, std::vector<acc_t>& rows, scalar_t* out) {
  rows.assign(out_h * w_in, acc_t(0));
  for (int64_t i = 0; i < out_h; ++i) {  // rows first: the wide pass is contiguous in x
    acc_t* row = rows.data() + i * w_in;
    for (int64_t t = 0; t < ay.count[i]; ++t) {
      const acc_t wt = ay.weight[i * ay.taps + t];
      const scalar_t* src = in + (ay.start[i] + t) * w_in;
      for (int64_t x = 0; x < w_in; ++x) row[x] += wt * static_cast<acc_t>(src[x]);
    }
  }
  for (int64_t i = 0; i < out_h; ++i) {
    const acc_t* row = rows.data() + i * w_in;
    for (int64_t j = 0; j < out_w; ++j) {
      const acc_t* wt = ax.weight.data() + j * ax.taps;
      const acc_t* src = row + ax.start[j];
      acc_t sum = 0;
      for (int64_t t = 0; t < ax.count[j]; ++t) sum += wt[t] * src[t];
      out[i * out_w + j] = static_cast<scalar_t>(scale * sum + bias);
    }
  }
}

// grad_in += scale * R_y^T g R_x for one backbone's gradient plane g, both passes as gathers through
// the transposed tables (each intermediate value written once; the long loop contiguous in x).
template <typename scalar_t, typename acc_t>
void add_resize_grad(const scalar_t* g, int64_t h_in, int64_t w_in, const Axis<acc_t>& ay_t, const Axis<acc_t>& ax_t,
                     int64_t out_h, int64_t out_w, acc_t scale, std::vector<acc_t>& rows, acc_t* grad_in) {
  rows.resize(out_h * w_in);
  for (int64_t i = 0; i < out_h; ++i) {
    const scalar_t* src = g + i * out_w;
    acc_t* row = rows.data() + i * w_in;
    for (int64_t x = 0; x < w_in; ++x) {
      const acc_t* wt = ax_t.weight.data() + x * ax_t.taps;
      const scalar_t* s = src + ax_t.start[x];
      acc_t sum = 0;
      for (int64_t t = 0; t < ax_t.count[x]; ++t) sum += wt[t] * static_cast<acc_t>(s[t]);
      row[x] = scale * sum;
    }
  }
  for (int64_t y = 0; y < h_in; ++y) {
    acc_t* dst = grad_in + y * w_in;
    for (int64_t t = 0; t < ay_t.count[y]; ++t) {
      const acc_t wt = ay_t.weight[y * ay_t.taps + t];
      const acc_t* row = rows.data() + (ay_t.start[y] + t) * w_in;
      for (int64_t x = 0; x < w_in; ++x) dst[x] += wt * row[x];
    }
  }
}

// Where a plane's gradient is summed: the output itself when it is in the accumulation type,
// else a scratch plane rounded into the output once at the end.
template <typename acc_t>
acc_t* sum_buffer(acc_t* out_plane, std::vector<acc_t>&, int64_t) {
  return out_plane;
}
template <typename scalar_t, typename acc_t>
acc_t* sum_buffer(scalar_t*, std::vector<acc_t>& scratch, int64_t n) {
  scratch.resize(n);
  return scratch.data();
}

template <typename acc_t>
std::vector<std::pair<Axis<acc_t>, Axis<acc_t>>> axes(const std::vector<SpecTables>& tables, bool transposed) {
  std::vector<std::pair<Axis<acc_t>, Axis<acc_t>>> out;
  for (const SpecTables& t : tables)
    out.emplace_back(Axis<acc_t>(transposed ? t.y_t : t.y), Axis<acc_t>(transposed ? t.x_t : t.x));
  return out;
}

}  // namespace

std::vector<at::Tensor> forward_cpu(const at::Tensor& images_, const std::vector<Spec>& specs) {
  const at::Tensor images = images_.contiguous();
  const int64_t n = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3);
  std::vector<SpecTables> tables;
  std::vector<at::Tensor> outs;
  for (const Spec& s : specs) {
    tables.push_back(spec_tables(s, h, w));
    outs.push_back(at::empty({n, c, s.out_h, s.out_w}, images.options()));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "opad_feature_pass_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ax = axes<acc_t>(tables, false);
    const scalar_t* in = images.const_data_ptr<scalar_t>();
    at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> rows;
      for (int64_t plane = begin; plane < end; ++plane) {
        for (size_t k = 0; k < specs.size(); ++k) {
          const Spec& s = specs[k];
          scalar_t* out = outs[k].mutable_data_ptr<scalar_t>() + plane * s.out_h * s.out_w;
          resize_plane<scalar_t, acc_t>(in + plane * h * w, w, ax[k].first, ax[k].second, s.out_h, s.out_w,
                                        static_cast<acc_t>(s.scale[plane % c]), static_cast<acc_t>(s.bias[plane % c]),
                                        rows, out);
        }
      }
    });
  });
  return outs;
}

at::Tensor backward_cpu(const std::vector<at::Tensor>& grads_, const std::vector<Spec>& specs, int64_t h, int64_t w) {
  std::vector<at::Tensor> grads;
  for (const at::Tensor& g : grads_) grads.push_back(g.contiguous());
  const int64_t n = grads[0].size(0), c = grads[0].size(1);
  std::vector<SpecTables> tables;
  for (const Spec& s : specs) tables.push_back(spec_tables(s, h, w));
  at::Tensor grad_in = at::empty({n, c, h, w}, grads[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_in.scalar_type(), "opad_feature_pass_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ax = axes<acc_t>(tables, true);
    scalar_t* out = grad_in.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> rows, scratch;
      for (int64_t plane = begin; plane < end; ++plane) {
        scalar_t* out_plane = out + plane * h * w;
        acc_t* sum = sum_buffer(out_plane, scratch, h * w);  // all K gradients meet here, in cache
        std::fill(sum, sum + h * w, acc_t(0));
        for (size_t k = 0; k < specs.size(); ++k) {
          const Spec& s = specs[k];
          const scalar_t* g = grads[k].const_data_ptr<scalar_t>() + plane * s.out_h * s.out_w;
          add_resize_grad<scalar_t, acc_t>(g, h, w, ax[k].first, ax[k].second, s.out_h, s.out_w,
                                           static_cast<acc_t>(s.scale[plane % c]), rows, sum);
        }
        if (static_cast<void*>(sum) != static_cast<void*>(out_plane))
          for (int64_t i = 0; i < h * w; ++i) out_plane[i] = static_cast<scalar_t>(sum[i]);
      }
    });
  });
  return grad_in;
}

}  // namespace opad
