// FlexPool's weighted sum for inference on CPU, float32, in one pass over x:
//   y[b, c] = sum_s x[b, c, s] * a[c, s]   (s runs over the H*W positions)
// PyTorch has no single op for this; a multiply and a sum write and re-read a
// temporary the size of x, which is what kept FlexPool at 2-3x of x.mean((2, 3)).
// Built at first use by flexsurgeon/cpu_kernel.py (torch.utils.cpp_extension).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace {

// GCC/Clang vector extension: 8 floats, one AVX register where the build enables AVX2,
// two SSE/NEON registers elsewhere. memcpy makes unaligned loads well defined.
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Work per parallel task, in multiply-adds: below this a thread wake-up costs more.
constexpr int64_t kGrainMacs = 32768;

// NCHW: every (b, c) row of S positions is contiguous; a is (C, S).
void rows(const float* x, const float* a, float* y, int64_t B, int64_t C, int64_t S) {
  at::parallel_for(0, B * C, std::max<int64_t>(1, kGrainMacs / S), [&](int64_t begin, int64_t end) {
    int64_t c = begin % C;
    const float* xr = x + begin * S;
    const float* ar = a + c * S;
    for (int64_t i = begin; i < end; ++i) {
      // Two accumulators so consecutive multiply-adds do not wait on each other.
      v8f s0 = {}, s1 = {};
      int64_t s = 0;
      for (; s + 16 <= S; s += 16) {
        s0 += load8(xr + s) * load8(ar + s);
        s1 += load8(xr + s + 8) * load8(ar + s + 8);
      }
      if (s + 8 <= S) {
        s0 += load8(xr + s) * load8(ar + s);
        s += 8;
      }
      s0 += s1;
      float t = ((s0[0] + s0[4]) + (s0[1] + s0[5])) + ((s0[2] + s0[6]) + (s0[3] + s0[7]));
      for (; s < S; ++s) t += xr[s] * ar[s];
      y[i] = t;
      xr += S;
      ar += S;
      if (++c == C) {
        c = 0;
        ar = a;
      }
    }
  });
}

// channels_last: x is (B, S, C) in memory; a is (S, C). Each task owns a block of
// channels of one image and streams over the positions, accumulating in y.
void cols(const float* x, const float* a, float* y, int64_t B, int64_t C, int64_t S) {
  constexpr int64_t kBlock = 256;  // channels per task: a 1 KB accumulator row
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  std::fill(y, y + B * C, 0.f);
  at::parallel_for(0, B * blocks, std::max<int64_t>(1, kGrainMacs / (S * kBlock)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, c0 = (i % blocks) * kBlock, c1 = std::min(C, c0 + kBlock);
      float* yr = y + b * C;
      const float* xb = x + b * S * C;
      for (int64_t s = 0; s < S; ++s) {
        const float* xr = xb + s * C;
        const float* ar = a + s * C;
        for (int64_t c = c0; c < c1; ++c) yr[c] += xr[c] * ar[c];
      }
    }
  });
}

}  // namespace

// x: (B, C, H, W) float32 on CPU, contiguous as NCHW, or as channels_last when
// channels_last is true. a: (1, C, H*W) for NCHW, (1, H*W, C) for channels_last,
// contiguous float32. Returns (B, C), contiguous.
torch::Tensor weighted_sum(const torch::Tensor& x, const torch::Tensor& a, bool channels_last) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "flex_pool_cpu: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "flex_pool_cpu: x is not contiguous in the memory format given");
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2) * x.size(3);
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat && a.is_contiguous() && a.numel() == C * S,
              "flex_pool_cpu: a must be a contiguous float32 CPU tensor of C*H*W elements");
  auto y = torch::empty({B, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  (channels_last ? cols : rows)(x.data_ptr<float>(), a.data_ptr<float>(), y.data_ptr<float>(), B, C, S);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weighted_sum", &weighted_sum, "FlexPool weighted sum, one pass over x (CPU, float32)");
}
