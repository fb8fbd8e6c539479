// CUDA implementation: one launch writes all K backbone inputs (a thread per output pixel, its
// window gathered straight from the image, which stays in L2 across the K inputs); one launch
// writes the image gradient (a thread per image pixel, gathering every backbone's gradient through
// the transposed tables: one write per pixel, no atomics, deterministic).
//
// The tables of all K inputs and the per-input metadata travel in one pinned host buffer and one
// asynchronous copy; the caching host allocator keeps it alive until the copy has run. (Only c10
// headers: ATen/cuda/CUDAContext.h would need the cuSPARSE/cuBLAS headers, which a bare nvcc lacks.)
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include "feature_pass.h"

namespace opad {
namespace {

// per input k: tensor pointer, out_h, out_w, first flat output element, then for the y and x
// tables their first row, first weight and tap count, and the offset of its (scale, bias) pairs
constexpr int kPtr = 0, kOutH = 1, kOutW = 2, kBegin = 3, kYRow = 4, kYW = 5, kYTaps = 6, kXRow = 7, kXW = 8,
              kXTaps = 9, kAffine = 10, kFields = 11;
constexpr int kThreads = 256;

template <typename acc_t>
struct Packed {  // device views into the one uploaded buffer
  at::Tensor buffer;
  const int64_t* meta;
  const acc_t* weight;
  const acc_t* affine;
  const int32_t* index;  // (start, count) per table row
};

size_t align8(size_t n) { return (n + 7) & ~size_t(7); }

// Packs, for each spec, the two tables `pick` selects and its affine map, then uploads them.
template <typename acc_t, typename Pick>
Packed<acc_t> upload(const std::vector<Spec>& specs, const std::vector<SpecTables>& tables,
                     const std::vector<int64_t>& ptrs, const std::vector<int64_t>& begins, int64_t channels,
                     const at::Device& device, Pick pick) {
  const size_t k = specs.size();
  std::vector<int64_t> meta(k * kFields);
  std::vector<acc_t> weight, affine;
  std::vector<int32_t> index;
  for (size_t s = 0; s < k; ++s) {
    const auto [ty, tx] = pick(tables[s]);
    int64_t* m = meta.data() + s * kFields;
    m[kPtr] = ptrs[s];
    m[kOutH] = specs[s].out_h;
    m[kOutW] = specs[s].out_w;
    m[kBegin] = begins[s];
    const AxisTable* axes[2] = {ty, tx};
    for (int a = 0; a < 2; ++a) {
      m[a ? kXRow : kYRow] = index.size() / 2;
      m[a ? kXW : kYW] = weight.size();
      m[a ? kXTaps : kYTaps] = axes[a]->taps;
      for (size_t r = 0; r < axes[a]->start.size(); ++r) {
        index.push_back(static_cast<int32_t>(axes[a]->start[r]));
        index.push_back(static_cast<int32_t>(axes[a]->count[r]));
      }
      weight.insert(weight.end(), axes[a]->weight.begin(), axes[a]->weight.end());
    }
    m[kAffine] = affine.size();
    for (int64_t c = 0; c < channels; ++c) {
      affine.push_back(static_cast<acc_t>(specs[s].scale[c]));
      affine.push_back(static_cast<acc_t>(specs[s].bias[c]));
    }
  }
  const size_t meta_bytes = align8(meta.size() * sizeof(int64_t));
  const size_t weight_bytes = align8(weight.size() * sizeof(acc_t));
  const size_t affine_bytes = align8(affine.size() * sizeof(acc_t));
  const size_t total = meta_bytes + weight_bytes + affine_bytes + index.size() * sizeof(int32_t);
  at::Tensor host = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* p = host.mutable_data_ptr<uint8_t>();
  std::memcpy(p, meta.data(), meta.size() * sizeof(int64_t));
  std::memcpy(p + meta_bytes, weight.data(), weight.size() * sizeof(acc_t));
  std::memcpy(p + meta_bytes + weight_bytes, affine.data(), affine.size() * sizeof(acc_t));
  std::memcpy(p + meta_bytes + weight_bytes + affine_bytes, index.data(), index.size() * sizeof(int32_t));
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const uint8_t* d = dev.const_data_ptr<uint8_t>();
  return {dev, reinterpret_cast<const int64_t*>(d), reinterpret_cast<const acc_t*>(d + meta_bytes),
          reinterpret_cast<const acc_t*>(d + meta_bytes + weight_bytes),
          reinterpret_cast<const int32_t*>(d + meta_bytes + weight_bytes + affine_bytes)};
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ in, int64_t channels, int64_t h, int64_t w, int k_inputs,
                               const int64_t* __restrict__ meta, const acc_t* __restrict__ weight,
                               const acc_t* __restrict__ affine, const int32_t* __restrict__ index, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int k = 0;
    while (k + 1 < k_inputs && e >= meta[(k + 1) * kFields + kBegin]) ++k;
    const int64_t* m = meta + k * kFields;
    const int64_t oh = m[kOutH], ow = m[kOutW], local = e - m[kBegin];
    const int64_t j = local % ow, i = (local / ow) % oh, plane = local / (ow * oh);
    const int64_t c = plane % channels;
    const int32_t ys = index[2 * (m[kYRow] + i)], yc = index[2 * (m[kYRow] + i) + 1];
    const int32_t xs = index[2 * (m[kXRow] + j)], xc = index[2 * (m[kXRow] + j) + 1];
    const acc_t* wy = weight + m[kYW] + i * m[kYTaps];
    const acc_t* wx = weight + m[kXW] + j * m[kXTaps];
    const scalar_t* src = in + plane * h * w + static_cast<int64_t>(ys) * w + xs;
    acc_t sum = 0;
    for (int ty = 0; ty < yc; ++ty) {
      acc_t row = 0;
      for (int tx = 0; tx < xc; ++tx) row += wx[tx] * static_cast<acc_t>(src[ty * w + tx]);
      sum += wy[ty] * row;
    }
    const acc_t* a = affine + m[kAffine] + 2 * c;
    reinterpret_cast<scalar_t*>(m[kPtr])[local] = static_cast<scalar_t>(a[0] * sum + a[1]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(scalar_t* __restrict__ grad_in, int64_t channels, int64_t h, int64_t w, int k_inputs,
                                const int64_t* __restrict__ meta, const acc_t* __restrict__ weight,
                                const acc_t* __restrict__ affine, const int32_t* __restrict__ index, int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = e % w, y = (e / w) % h, plane = e / (w * h);
    const int64_t c = plane % channels;
    acc_t acc = 0;
    for (int k = 0; k < k_inputs; ++k) {  // the transposed tables: rows are image pixels
      const int64_t* m = meta + k * kFields;
      const int64_t oh = m[kOutH], ow = m[kOutW];
      const int32_t is = index[2 * (m[kYRow] + y)], ic = index[2 * (m[kYRow] + y) + 1];
      const int32_t js = index[2 * (m[kXRow] + x)], jc = index[2 * (m[kXRow] + x) + 1];
      const acc_t* wy = weight + m[kYW] + y * m[kYTaps];
      const acc_t* wx = weight + m[kXW] + x * m[kXTaps];
      const scalar_t* g = reinterpret_cast<const scalar_t*>(m[kPtr]) + plane * oh * ow + static_cast<int64_t>(is) * ow + js;
      acc_t sum = 0;
      for (int ti = 0; ti < ic; ++ti) {
        acc_t row = 0;
        for (int tj = 0; tj < jc; ++tj) row += wx[tj] * static_cast<acc_t>(g[ti * ow + tj]);
        sum += wy[ti] * row;
      }
      acc += affine[m[kAffine] + 2 * c] * sum;
    }
    grad_in[e] = static_cast<scalar_t>(acc);
  }
}

int blocks_for(int64_t total) {
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 32;  // a grid-stride loop covers the rest
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

}  // namespace

std::vector<at::Tensor> forward_cuda(const at::Tensor& images_, const std::vector<Spec>& specs) {
  const c10::cuda::CUDAGuard guard(images_.device());
  const at::Tensor images = images_.contiguous();
  const int64_t n = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3);
  std::vector<SpecTables> tables;
  std::vector<at::Tensor> outs;
  std::vector<int64_t> ptrs, begins;
  int64_t total = 0;
  for (const Spec& s : specs) {
    tables.push_back(spec_tables(s, h, w));
    outs.push_back(at::empty({n, c, s.out_h, s.out_w}, images.options()));
    ptrs.push_back(reinterpret_cast<int64_t>(outs.back().data_ptr()));
    begins.push_back(total);
    total += outs.back().numel();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "opad_feature_pass_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto packed = upload<acc_t>(specs, tables, ptrs, begins, c, images.device(),
                                      [](const SpecTables& t) { return std::make_pair(&t.y, &t.x); });
    forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        images.const_data_ptr<scalar_t>(), c, h, w, static_cast<int>(specs.size()), packed.meta, packed.weight,
        packed.affine, packed.index, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return outs;
}

at::Tensor backward_cuda(const std::vector<at::Tensor>& grads_, const std::vector<Spec>& specs, int64_t h, int64_t w) {
  const c10::cuda::CUDAGuard guard(grads_[0].device());
  std::vector<at::Tensor> grads;
  std::vector<int64_t> ptrs, begins(specs.size(), 0);
  for (const at::Tensor& g : grads_) {
    grads.push_back(g.contiguous());
    ptrs.push_back(reinterpret_cast<int64_t>(grads.back().data_ptr()));
  }
  const int64_t n = grads[0].size(0), c = grads[0].size(1);
  std::vector<SpecTables> tables;
  for (const Spec& s : specs) tables.push_back(spec_tables(s, h, w));
  at::Tensor grad_in = at::empty({n, c, h, w}, grads[0].options());
  const int64_t total = grad_in.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_in.scalar_type(), "opad_feature_pass_cuda_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto packed = upload<acc_t>(specs, tables, ptrs, begins, c, grad_in.device(),
                                      [](const SpecTables& t) { return std::make_pair(&t.y_t, &t.x_t); });
    backward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_in.mutable_data_ptr<scalar_t>(), c, h, w, static_cast<int>(specs.size()), packed.meta, packed.weight,
        packed.affine, packed.index, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

}  // namespace opad
