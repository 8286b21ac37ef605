// Rotary position embedding ("rotate half", as fair-esm's ESM-2 applies it) on bf16
// queries or keys with fp32 cos/sin tables, forward and backward, in one pass each.
// Built at first use by rotary.py.
//
// fair-esm computes x * cos + rotate_half(x) * sin with fp32 tables, so a bf16 x
// becomes fp32 products and sums that the attention then rounds to bf16: six tensors
// of fp32 temporaries a layer, and as many again in the backward pass. Here each
// element is computed as torch computes it (fp32 products, an fp32 sum, one rounding
// to nearest even) and the backward pass rounds where autograd rounds (each product's
// gradient to x's bf16, then their bf16 sum), so both directions are bit for bit
// torch's. Built with -ffp-contract=off: a fused multiply-add would round once where
// torch rounds twice.
//
// Layout: x and its gradient are (batch, heads, tokens, width) with unit stride in the
// last dimension; cos and sin hold one fp32 row of `width` per token.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

void check(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.stride(3) == 1,
              "rotary: x must be a bf16 (batch, heads, tokens, width) tensor with unit stride in width");
  TORCH_CHECK(x.size(3) % 2 == 0 && x.size(3) <= 64, "rotary: the head width must be even and at most 64");
  for (const at::Tensor& table : {cos, sin}) {
    TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == x.size(2) * x.size(3),
                "rotary: cos and sin must be contiguous fp32 with one row of the head width per token");
  }
}

// bf16 <-> fp32 as torch converts: widening is exact, narrowing rounds to nearest even.
inline float widen(uint16_t bits) {
  uint32_t word = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

inline uint16_t narrow(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) {
    return 0x7fc0;  // NaN
  }
  return uint16_t((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
}

// One head's row of W values: forward writes x * cos + rotate_half(x) * sin, where
// rotate_half(x) = (-x[half:], x[:half]); backward writes x's gradient, rounded where
// autograd rounds (each product's gradient to bf16, then their bf16 sum).
template <int W, bool Backward>
inline void rotate_row(const uint16_t* in, uint16_t* out, const float* c, const float* s, int width) {
  const int n = W > 0 ? W : width, half = n / 2;
  float x[64], rotated[64];
  for (int i = 0; i < n; ++i) x[i] = widen(in[i]);
  if (!Backward) {
    for (int i = 0; i < half; ++i) rotated[i] = -x[i + half];
    for (int i = half; i < n; ++i) rotated[i] = x[i - half];
    for (int i = 0; i < n; ++i) {
      const float direct = x[i] * c[i];
      const float turned = rotated[i] * s[i];
      out[i] = narrow(direct + turned);
    }
  } else {
    float direct[64], turned[64];
    for (int i = 0; i < n; ++i) {
      direct[i] = widen(narrow(x[i] * c[i]));
      turned[i] = widen(narrow(x[i] * s[i]));
    }
    for (int i = 0; i < half; ++i) out[i] = narrow(direct[i] + turned[i + half]);
    for (int i = half; i < n; ++i) out[i] = narrow(direct[i] - turned[i - half]);
  }
}

template <bool Backward>
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check(x, cos, sin);
  at::Tensor out = at::empty_like(x);
  const int64_t batch = x.size(0), heads = x.size(1), tokens = x.size(2);
  const int width = int(x.size(3));
  const auto* x_data = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  auto* out_data = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  const float* cos_data = cos.const_data_ptr<float>();
  const float* sin_data = sin.const_data_ptr<float>();
  // (batch, token) outer and heads inner: the model's q and k are (batch, token, head) in memory
  at::parallel_for(0, batch * tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / tokens, t = row % tokens;
      const float* c = cos_data + t * width;
      const float* s = sin_data + t * width;
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* in = x_data + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        uint16_t* o = out_data + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
        switch (width) {
          case 16: rotate_row<16, Backward>(in, o, c, s, width); break;
          case 24: rotate_row<24, Backward>(in, o, c, s, width); break;
          case 32: rotate_row<32, Backward>(in, o, c, s, width); break;
          default: rotate_row<0, Backward>(in, o, c, s, width);
        }
      }
    }
  });
  return out;
}

at::Tensor rotary_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rotate<false>(x, cos, sin);
}

at::Tensor rotary_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin) {
  return rotate<true>(grad, cos, sin);
}

}  // namespace

TORCH_LIBRARY(peftlab_rotary, m) {
  m.def("forward(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("backward(Tensor grad, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(peftlab_rotary, CPU, m) {
  m.impl("forward", &rotary_forward);
  m.impl("backward", &rotary_backward);
}
