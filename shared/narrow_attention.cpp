// Attention for narrow heads (16-32 wide) on CPU, forward and backward, computed in
// fp32 one (sequence, head) at a time. Built at first use by narrow_attention.py.
//
// Why not torch's fused CPU kernel: with heads 16 wide its block matmuls are too thin to
// pay for their setup, and it spends ~7 cycles per attention score; ESM-2 8M training
// then spends half its step in attention. Here the scores of 8 query rows against 16
// keys live in registers (each key value loaded once serves 8 queries), the softmax
// uses a branch-free exp the compiler vectorises, and the backward pass handles dQ,
// dK and dV in one sweep over the keys.
//
// Layout: q, k, v are (batch, heads, tokens, head width) with unit stride in the last
// dimension (any other strides: the model's views of (batch, tokens, heads, width)
// projections come in as they are). `spans` (n, 3) int64 rows are (batch row, first
// token, end token) of each sequence; attention stays within a span, and positions
// outside every span come out as zeros. The softmax scale is 1/sqrt(head width).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <immintrin.h>
#define PEFTLAB_BF16_PAIRS 1
#endif

namespace {

constexpr int kRows = 8;   // query rows scored together: each loaded key value serves all 8
constexpr int kCols = 16;  // keys scored together: one 512-bit register of fp32

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Explicit SIMD through GCC/Clang vector extensions: 8 fp32 lanes (256 bits, the
// width AVX2 and AVX-512VL both run at full rate), compiled for the build machine.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef float f8_unaligned __attribute__((vector_size(32), aligned(4)));
constexpr int kLanes = 8;
template <int D>
constexpr int kUnits = D / kLanes;  // vectors per row of a head

inline f8 load(const float* p) { return *reinterpret_cast<const f8_unaligned*>(p); }
inline void store(float* p, f8 v) { *reinterpret_cast<f8_unaligned*>(p) = v; }
inline f8 splat(float x) { return f8{} + x; }

// exp(x) for x <= 0 within 2 ulp: range reduction by ln 2, degree-6 polynomial.
inline f8 exp_approx(f8 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const f8 round = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f8 n = (x * 1.44269504088896341f + round) - round;
  const f8 r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  f8 p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  return p * reinterpret_cast<const f8&>(bits);
}

struct View {  // one (batch row, head) of a (batch, heads, tokens, width) tensor
  int64_t batch_stride, head_stride, token_stride;
};

View view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// rows [start, start + length) of one head into `out` (rows x D, zero beyond length)
template <int D, typename T>
void load_rows(const T* base, int64_t token_stride, int64_t length, float scale, float* out) {
  for (int64_t i = 0; i < length; ++i)
    for (int c = 0; c < D; ++c) out[i * D + c] = static_cast<float>(base[i * token_stride + c]) * scale;
}

// the same rows transposed: out is D x padded_length, zero beyond length
template <int D, typename T>
void load_transposed(const T* base, int64_t token_stride, int64_t length, int64_t padded_length, float* out) {
  for (int64_t i = 0; i < length; ++i)
    for (int c = 0; c < D; ++c) out[c * padded_length + i] = static_cast<float>(base[i * token_stride + c]);
}

// out[r][j] = sum_c a[r][c] * bt[c][j] for kRows rows of `a` (kRows x D) and all
// padded_length columns of `bt` (D x padded_length)
template <int D>
void row_block_products(const float* a, const float* bt, int64_t padded_length, float* out) {
  for (int64_t j = 0; j < padded_length; j += kCols) {
    f8 acc[kRows][2] = {};
    for (int c = 0; c < D; ++c) {
      const f8 b0 = load(bt + c * padded_length + j), b1 = load(bt + c * padded_length + j + kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float a_rc = a[r * D + c];
        acc[r][0] += a_rc * b0;
        acc[r][1] += a_rc * b1;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      store(out + r * padded_length + j, acc[r][0]);
      store(out + r * padded_length + j + kLanes, acc[r][1]);
    }
  }
}

#ifdef PEFTLAB_BF16_PAIRS
// bf16 rows as their bit patterns (rows x D, zero beyond length)
template <int D>
void load_bf16_rows(const at::BFloat16* base, int64_t token_stride, int64_t length, uint16_t* out) {
  for (int64_t i = 0; i < length; ++i)
    for (int c = 0; c < D; ++c) out[i * D + c] = base[i * token_stride + c].x;
}

// bf16 rows transposed in pairs of columns: out[c / 2][i][c % 2], (D / 2) x padded_length x 2
template <int D>
void load_bf16_pairs(const at::BFloat16* base, int64_t token_stride, int64_t length, int64_t padded_length,
                     uint16_t* out) {
  for (int64_t i = 0; i < length; ++i)
    for (int c = 0; c < D; ++c) out[((c / 2) * padded_length + i) * 2 + c % 2] = base[i * token_stride + c].x;
}

// row_block_products on bf16 operands: one instruction multiplies 8 pairs and adds them
// into 8 fp32 sums (AVX512-BF16), twice the products of an fp32 FMA; products of bf16
// values are exact in fp32
template <int D>
void row_block_products_bf16(const uint16_t* a, const uint16_t* b_pairs, int64_t padded_length, float scale,
                             float* out) {
  for (int64_t j = 0; j < padded_length; j += kCols) {
    __m256 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int c2 = 0; c2 < D / 2; ++c2) {
      const uint16_t* b = b_pairs + (c2 * padded_length + j) * 2;
      const __m256bh b0 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
      const __m256bh b1 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2 * kLanes));
      for (int r = 0; r < kRows; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * D + 2 * c2, sizeof pair);
        const __m256bh a_pair = (__m256bh)_mm256_set1_epi32(pair);
        acc[r][0] = _mm256_dpbf16_ps(acc[r][0], a_pair, b0);
        acc[r][1] = _mm256_dpbf16_ps(acc[r][1], a_pair, b1);
      }
    }
    const __m256 s = _mm256_set1_ps(scale);
    for (int r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(out + r * padded_length + j, _mm256_mul_ps(acc[r][0], s));
      _mm256_storeu_ps(out + r * padded_length + j + kLanes, _mm256_mul_ps(acc[r][1], s));
    }
  }
}
#endif

// scale * (rows . columns) for one head of a sequence, kRows rows at a time: in fp32, or
// from bf16 inputs on bf16 pairs where the CPU has them
template <int D, typename T>
class BlockProducts {
 public:
#ifdef PEFTLAB_BF16_PAIRS
  static constexpr bool kPairs = std::is_same_v<T, at::BFloat16>;
#else
  static constexpr bool kPairs = false;
#endif

  BlockProducts(const T* rows_base, int64_t rows_stride, const T* columns_base, int64_t columns_stride,
                int64_t length, float scale)
      : padded_(round_up(length, kCols)), scale_(scale) {
    const int64_t rows = round_up(length, kRows);
    if constexpr (kPairs) {
#ifdef PEFTLAB_BF16_PAIRS
      rows_bf16_.assign(rows * D, 0);
      columns_bf16_.assign(D * padded_, 0);
      load_bf16_rows<D>(rows_base, rows_stride, length, rows_bf16_.data());
      load_bf16_pairs<D>(columns_base, columns_stride, length, padded_, columns_bf16_.data());
#endif
    } else {
      rows_.assign(rows * D, 0.0f);
      columns_t_.assign(D * padded_, 0.0f);
      load_rows<D>(rows_base, rows_stride, length, scale, rows_.data());
      load_transposed<D>(columns_base, columns_stride, length, padded_, columns_t_.data());
    }
  }

  // out (kRows x padded) for rows [i0, i0 + kRows)
  void block(int64_t i0, float* out) const {
    if constexpr (kPairs) {
#ifdef PEFTLAB_BF16_PAIRS
      row_block_products_bf16<D>(rows_bf16_.data() + i0 * D, columns_bf16_.data(), padded_, scale_, out);
#endif
    } else {
      row_block_products<D>(rows_.data() + i0 * D, columns_t_.data(), padded_, out);  // rows_ pre-scaled
    }
  }

 private:
  int64_t padded_;
  float scale_;
  std::vector<float> rows_, columns_t_;
  std::vector<uint16_t> rows_bf16_, columns_bf16_;
};

struct Task {
  int64_t row, start, length, head;
};

std::vector<Task> tasks_of(const at::Tensor& spans, int64_t heads) {
  const auto s = spans.accessor<int64_t, 2>();
  std::vector<Task> tasks;
  for (int64_t i = 0; i < s.size(0); ++i)
    for (int64_t h = 0; h < heads; ++h) tasks.push_back({s[i][0], s[i][1], s[i][2] - s[i][1], h});
  return tasks;
}

template <int D, typename T>
void forward_task(const Task& task, const T* q, const T* k, const T* v, View qv, View kv, View vv, T* out,
                  View ov, float* lse, View lv) {
  const int64_t length = task.length, rows = round_up(length, kRows), padded = round_up(length, kCols);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> values(length * D), probs(kRows * padded);
  auto at = [&](const T* base, View w) { return base + task.row * w.batch_stride + task.head * w.head_stride
                                                 + task.start * w.token_stride; };
  const BlockProducts<D, T> scores(at(q, qv), qv.token_stride, at(k, kv), kv.token_stride, length, scale);
  load_rows<D>(at(v, vv), vv.token_stride, length, 1.0f, values.data());
  T* out_base = out + task.row * ov.batch_stride + task.head * ov.head_stride + task.start * ov.token_stride;
  float* lse_base = lse + task.row * lv.batch_stride + task.head * lv.head_stride + task.start * lv.token_stride;

  for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
    scores.block(i0, probs.data());
    float inverse_sum[kRows];
    for (int r = 0; r < kRows; ++r) {
      float* p = probs.data() + r * padded;
      for (int64_t j = length; j < padded; ++j) p[j] = -3.0e38f;  // keys past the sequence: no weight
      f8 max8 = load(p);
      for (int64_t j = kLanes; j < padded; j += kLanes) {
        const f8 x = load(p + j);
        max8 = x > max8 ? x : max8;
      }
      float max = max8[0];
      for (int lane = 1; lane < kLanes; ++lane) max = std::max(max, max8[lane]);
      for (int64_t j = 0; j < padded; j += kLanes) store(p + j, exp_approx(load(p + j) - max));
      for (int64_t j = length; j < padded; ++j) p[j] = 0.0f;
      f8 sum8 = {};
      for (int64_t j = 0; j < padded; j += kLanes) sum8 += load(p + j);
      float sum = 0.0f;
      for (int lane = 0; lane < kLanes; ++lane) sum += sum8[lane];
      inverse_sum[r] = 1.0f / sum;
      if (i0 + r < length) lse_base[(i0 + r) * lv.token_stride] = max + std::log(sum);
    }
    f8 acc[kRows][kUnits<D>] = {};
    for (int64_t j = 0; j < length; ++j) {
      f8 value[kUnits<D>];
      for (int u = 0; u < kUnits<D>; ++u) value[u] = load(values.data() + j * D + u * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float p = probs[r * padded + j];
        for (int u = 0; u < kUnits<D>; ++u) acc[r][u] += p * value[u];
      }
    }
    for (int r = 0; r < kRows && i0 + r < length; ++r)
      for (int u = 0; u < kUnits<D>; ++u) {
        const f8 o = acc[r][u] * inverse_sum[r];
        for (int lane = 0; lane < kLanes; ++lane)
          out_base[(i0 + r) * ov.token_stride + u * kLanes + lane] = static_cast<T>(o[lane]);
      }
  }
}

template <int D, typename T>
void backward_task(const Task& task, const T* grad_out, const T* q, const T* k, const T* v, const T* out,
                   const float* lse, View gv, View qv, View kv, View vv, View ov, View lv, T* grad_q, T* grad_k,
                   T* grad_v, View dv) {
  const int64_t length = task.length, rows = round_up(length, kRows), padded = round_up(length, kCols);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto at = [&](const auto* base, View w) { return base + task.row * w.batch_stride + task.head * w.head_stride
                                                  + task.start * w.token_stride; };
  // queries pre-scaled: the scores are scale * queries . keys and dK = sum_i dS_i scale * queries_i
  std::vector<float> queries(rows * D, 0.0f), grads(rows * D, 0.0f), keys(length * D), row_lse(rows, 0.0f),
      row_delta(rows, 0.0f), probs(kRows * padded), dscores(kRows * padded), grad_keys(length * D, 0.0f),
      grad_values(length * D, 0.0f);
  const BlockProducts<D, T> scores(at(q, qv), qv.token_stride, at(k, kv), kv.token_stride, length, scale);
  const BlockProducts<D, T> grad_probs(at(grad_out, gv), gv.token_stride, at(v, vv), vv.token_stride, length, 1.0f);
  load_rows<D>(at(q, qv), qv.token_stride, length, scale, queries.data());
  load_rows<D>(at(grad_out, gv), gv.token_stride, length, 1.0f, grads.data());
  load_rows<D>(at(k, kv), kv.token_stride, length, 1.0f, keys.data());
  const T* out_base = at(out, ov);
  const float* lse_base = at(lse, lv);
  for (int64_t i = 0; i < length; ++i) {  // delta_i = dO_i . O_i, the softmax backward's row term
    row_lse[i] = lse_base[i * lv.token_stride];
    float delta = 0.0f;
    for (int c = 0; c < D; ++c) delta += grads[i * D + c] * static_cast<float>(out_base[i * ov.token_stride + c]);
    row_delta[i] = delta;
  }
  T* grad_q_base = grad_q + task.row * dv.batch_stride + task.head * dv.head_stride + task.start * dv.token_stride;

  for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
    scores.block(i0, probs.data());
    grad_probs.block(i0, dscores.data());
    for (int r = 0; r < kRows; ++r) {
      float* p = probs.data() + r * padded;
      float* ds = dscores.data() + r * padded;
      const float lse_r = row_lse[i0 + r], delta_r = row_delta[i0 + r];
      for (int64_t j = 0; j < padded; j += kLanes) {  // past `length`: unused below
        const f8 e = exp_approx(load(p + j) - lse_r);
        store(p + j, e);
        store(ds + j, e * (load(ds + j) - delta_r));
      }
    }
    // padding rows (i0 + r >= length) have zero queries and output gradients: they add nothing below
    f8 block_queries[kRows][kUnits<D>], block_grads[kRows][kUnits<D>], grad_q_acc[kRows][kUnits<D>] = {};
    for (int r = 0; r < kRows; ++r)
      for (int u = 0; u < kUnits<D>; ++u) {
        block_queries[r][u] = load(queries.data() + (i0 + r) * D + u * kLanes);
        block_grads[r][u] = load(grads.data() + (i0 + r) * D + u * kLanes);
      }
    for (int64_t j = 0; j < length; ++j) {
      f8 key[kUnits<D>], grad_key[kUnits<D>], grad_value[kUnits<D>];
      for (int u = 0; u < kUnits<D>; ++u) {
        key[u] = load(keys.data() + j * D + u * kLanes);
        grad_key[u] = load(grad_keys.data() + j * D + u * kLanes);
        grad_value[u] = load(grad_values.data() + j * D + u * kLanes);
      }
      for (int r = 0; r < kRows; ++r) {
        const float ds = dscores[r * padded + j], p = probs[r * padded + j];
        for (int u = 0; u < kUnits<D>; ++u) {
          grad_q_acc[r][u] += ds * key[u];
          grad_key[u] += ds * block_queries[r][u];
          grad_value[u] += p * block_grads[r][u];
        }
      }
      for (int u = 0; u < kUnits<D>; ++u) {
        store(grad_keys.data() + j * D + u * kLanes, grad_key[u]);
        store(grad_values.data() + j * D + u * kLanes, grad_value[u]);
      }
    }
    for (int r = 0; r < kRows && i0 + r < length; ++r)
      for (int u = 0; u < kUnits<D>; ++u) {
        const f8 g = grad_q_acc[r][u] * scale;
        for (int lane = 0; lane < kLanes; ++lane)
          grad_q_base[(i0 + r) * dv.token_stride + u * kLanes + lane] = static_cast<T>(g[lane]);
      }
  }
  T* grad_k_base = grad_k + task.row * dv.batch_stride + task.head * dv.head_stride + task.start * dv.token_stride;
  T* grad_v_base = grad_v + task.row * dv.batch_stride + task.head * dv.head_stride + task.start * dv.token_stride;
  for (int64_t j = 0; j < length; ++j)
    for (int c = 0; c < D; ++c) {
      grad_k_base[j * dv.token_stride + c] = static_cast<T>(grad_keys[j * D + c]);
      grad_v_base[j * dv.token_stride + c] = static_cast<T>(grad_values[j * D + c]);
    }
}

// a (batch, heads, tokens, width) tensor laid out as (batch, tokens, heads, width), the
// layout the output projection reads
at::Tensor token_major_zeros(const at::Tensor& like) {
  return at::zeros({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

void check_inputs(const std::vector<at::Tensor>& tensors, const at::Tensor& spans) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.stride(3) == 1,
                "narrow_attention: expects CPU (batch, heads, tokens, width) tensors with unit last stride");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type() && t.sizes() == tensors[0].sizes(),
                "narrow_attention: q, k, v (and their gradients) must share dtype and shape");
  }
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.dim() == 2 && spans.size(1) == 3,
              "narrow_attention: spans must be an (n, 3) int64 tensor");
}

template <typename Fn>
void dispatch_width(int64_t width, Fn&& fn) {
  switch (width) {
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 24: fn(std::integral_constant<int, 24>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    default: TORCH_CHECK(false, "narrow_attention: head width ", width, " is not one of 16, 24, 32");
  }
}

// fn(task, head width as a constant, scalar_t* tag) for every (sequence, head), in parallel
template <typename Fn>
void for_each_task(const at::Tensor& q, const at::Tensor& spans, Fn&& fn) {
  const std::vector<Task> tasks = tasks_of(spans, q.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "narrow_attention", [&] {
    dispatch_width(q.size(3), [&](auto width) {
      at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) fn(tasks[t], width, static_cast<scalar_t*>(nullptr));
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> narrow_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& spans) {
  check_inputs({q, k, v}, spans);
  at::Tensor out = token_major_zeros(q);
  at::Tensor lse = at::zeros({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const View lv{lse.stride(0), lse.stride(1), lse.stride(2)};
  for_each_task(q, spans, [&](const Task& task, auto width, auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward_task<decltype(width)::value, T>(task, q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                                            view_of(q), view_of(k), view_of(v), out.mutable_data_ptr<T>(),
                                            view_of(out), lse.mutable_data_ptr<float>(), lv);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> narrow_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& spans) {
  check_inputs({grad_out, q, k, v, out}, spans);
  at::Tensor grad_q = token_major_zeros(q), grad_k = token_major_zeros(q), grad_v = token_major_zeros(q);
  const View lv{lse.stride(0), lse.stride(1), lse.stride(2)};
  for_each_task(q, spans, [&](const Task& task, auto width, auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    backward_task<decltype(width)::value, T>(
        task, grad_out.const_data_ptr<T>(), q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
        out.const_data_ptr<T>(), lse.const_data_ptr<float>(), view_of(grad_out), view_of(q), view_of(k),
        view_of(v), view_of(out), lv, grad_q.mutable_data_ptr<T>(), grad_k.mutable_data_ptr<T>(),
        grad_v.mutable_data_ptr<T>(), view_of(grad_q));
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY(peftlab_narrow_attention, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor spans) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor spans)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peftlab_narrow_attention, CPU, m) {
  m.impl("forward", &narrow_attention_forward);
  m.impl("backward", &narrow_attention_backward);
}
