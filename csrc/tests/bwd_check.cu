// Standalone check of the sm80 backward kernels (launch_bwd) against a CPU fp64 reference, and
// a timing mode for the benchmark grid. Links against the csrc/instantiations/bwd_*.cu objects
// only (no JAX, no FFI).
//
//   bwd_check            correctness cases; exit status 1 if any fails
//   bwd_check --small    the cases with seqlen_q * seqlen_k <= 1e5 (for compute-sanitizer)
//   bwd_check --time [d] backward TFLOP/s on the grid b * s = 16384, h = 2048 / d (bf16), for
//                        d = 64 and 128 or only the one given
//
// Oracle (DESIGN.md section 6): `ref` is the gradient in fp64 from the inputs the kernel sees,
// `base` the same with P and dS rounded to the input dtype before the products that use them (what
// the kernel does); a gradient passes when max|grad - ref| <= 3 * max|base - ref| + floor, floor
// = one rounding step of the dtype at the gradient's magnitude plus 1e-5 for gradients that
// vanish by cancellation (one visible key: dS = P (dP - D) is 0 up to fp32 rounding of two dot
// products of O(1) terms). Outputs are poisoned (NaN) before
// each run, so an unwritten element fails. The deterministic variant is also run twice and
// compared bitwise.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cutlass/numeric_types.h>

#include "flash_jax/launch.h"
#include "flash_jax/params.h"
#include "check_util.h"

namespace {

using flash_jax_check::bucket_for;
using flash_jax_check::round_to;

using flash_jax::BwdParams;

struct Case {
  const char* name;
  int batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim;
  bool causal = false;
  bool top_left = false;
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  bool with_dlse = false;
  bool deterministic = false;
  bool fp16 = false;
  int row_padding = 0;  // extra elements per row of q/k/v/out/dout (strided layouts)
};

template <typename Element>
std::string run_bucket(const BwdParams& params, cudaStream_t stream) {
  switch (params.head_dim_padded) {
    case 32: return flash_jax::launch_bwd<Element, 32>(params, stream);
    case 64: return flash_jax::launch_bwd<Element, 64>(params, stream);
    case 96: return flash_jax::launch_bwd<Element, 96>(params, stream);
    case 128: return flash_jax::launch_bwd<Element, 128>(params, stream);
    case 192: return flash_jax::launch_bwd<Element, 192>(params, stream);
    case 256: return flash_jax::launch_bwd<Element, 256>(params, stream);
  }
  return "no bucket";
}

std::string run_backward(const BwdParams& params, bool fp16, cudaStream_t stream) {
  return fp16 ? run_bucket<cutlass::half_t>(params, stream)
              : run_bucket<cutlass::bfloat16_t>(params, stream);
}

// Host tensor [batch, seq, heads, head_dim] with a row stride of heads * head_dim + row_padding
// (the padding is filled with garbage the kernels must not read into results).
struct HostTensor {
  int batch, seq, heads, head_dim, row_padding;
  std::vector<float> values;  // rounded to the dtype
  int64_t row_stride() const { return int64_t(heads) * head_dim + row_padding; }
  int64_t batch_stride() const { return row_stride() * seq; }
  int64_t size() const { return batch_stride() * batch; }
  int64_t index(int b, int s, int h, int d) const {
    return b * batch_stride() + s * row_stride() + int64_t(h) * head_dim + d;
  }
  float& at(int b, int s, int h, int d) { return values[index(b, s, h, d)]; }
  float at(int b, int s, int h, int d) const { return values[index(b, s, h, d)]; }
};

HostTensor make_tensor(int batch, int seq, int heads, int head_dim, int row_padding,
                       std::mt19937& rng, bool fp16, float stddev) {
  HostTensor t{batch, seq, heads, head_dim, row_padding, {}};
  t.values.resize(t.size());
  std::normal_distribution<float> normal(0.f, stddev);
  for (float& v : t.values) v = round_to(normal(rng), fp16);
  return t;
}

template <typename Element>
void* upload(const HostTensor& t) {
  std::vector<Element> converted(t.values.size());
  for (size_t i = 0; i < converted.size(); ++i) converted[i] = Element(t.values[i]);
  void* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, converted.size() * sizeof(Element)));
  CHECK_CUDA(cudaMemcpy(device, converted.data(), converted.size() * sizeof(Element),
                        cudaMemcpyHostToDevice));
  return device;
}

template <typename Element>
std::vector<float> download(const void* device, int64_t count) {
  std::vector<Element> host(count);
  CHECK_CUDA(cudaMemcpy(host.data(), device, count * sizeof(Element), cudaMemcpyDeviceToHost));
  std::vector<float> result(count);
  for (int64_t i = 0; i < count; ++i) result[i] = float(host[i]);
  return result;
}

bool key_visible(const Case& c, int row, int col) {
  const int offset = c.top_left ? 0 : c.seqlen_k - c.seqlen_q;
  const int diagonal = row + offset;
  if (c.causal && col > diagonal) return false;
  if (c.window_right >= 0 && col > diagonal + c.window_right) return false;
  if (c.window_left >= 0 && col < diagonal - c.window_left) return false;
  return true;
}

struct Reference {
  std::vector<float> out;  // [b, sq, h, d] contiguous, rounded to the dtype
  std::vector<float> lse;  // [b, h, sq]
  std::vector<double> dq, dk, dv, dq_base, dk_base, dv_base;  // [b, s, h, d] contiguous
};

// Forward (out, lse) and gradients in fp64 for the given inputs; `base` repeats the gradients
// with P and dS rounded to the dtype the way the kernel rounds them.
Reference reference(const Case& c, const HostTensor& q, const HostTensor& k, const HostTensor& v,
                    const HostTensor& dout, const std::vector<float>& dlse, float scale) {
  const int B = c.batch, SQ = c.seqlen_q, SK = c.seqlen_k, H = c.heads, D = c.head_dim;
  const int group = c.heads / c.kv_heads;
  Reference r;
  r.out.assign(int64_t(B) * SQ * H * D, 0.f);
  r.lse.assign(int64_t(B) * H * SQ, -INFINITY);
  r.dq.assign(int64_t(B) * SQ * H * D, 0.0);
  r.dq_base = r.dq;
  r.dk.assign(int64_t(B) * SK * H * D, 0.0);
  r.dv = r.dk;
  r.dk_base = r.dk;
  r.dv_base = r.dk;
  std::vector<double> logits(SK), tanh_values(SK), probs(SK);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int hk = h / group;
      for (int i = 0; i < SQ; ++i) {
        double max_logit = -INFINITY;
        for (int j = 0; j < SK; ++j) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += double(q.at(b, i, h, d)) * k.at(b, j, hk, d);
          double logit = scale * s;
          if (c.softcap > 0) {
            tanh_values[j] = std::tanh(logit / c.softcap);
            logit = c.softcap * tanh_values[j];
          }
          logits[j] = key_visible(c, i, j) ? logit : -INFINITY;
          max_logit = std::max(max_logit, logits[j]);
        }
        double sum = 0;
        for (int j = 0; j < SK; ++j) sum += logits[j] == -INFINITY ? 0 : std::exp(logits[j] - max_logit);
        const double lse = sum == 0 ? -INFINITY : max_logit + std::log(sum);
        const int64_t lse_index = (int64_t(b) * H + h) * SQ + i;
        r.lse[lse_index] = float(lse);
        const double lse_used = double(r.lse[lse_index]);  // the kernel sees the float
        for (int j = 0; j < SK; ++j) {
          probs[j] = (sum == 0 || logits[j] == -INFINITY) ? 0 : std::exp(logits[j] - lse_used);
        }
        const int64_t row = ((int64_t(b) * SQ + i) * H + h) * D;
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int j = 0; j < SK; ++j) o += probs[j] * v.at(b, j, hk, d);
          r.out[row + d] = round_to(float(o), c.fp16);
        }
        double row_d = c.with_dlse ? -double(dlse[lse_index]) : 0.0;
        for (int d = 0; d < D; ++d) row_d += double(dout.at(b, i, h, d)) * r.out[row + d];
        for (int j = 0; j < SK; ++j) {
          if (probs[j] == 0) continue;
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += double(dout.at(b, i, h, d)) * v.at(b, j, hk, d);
          const double dlogit_dqk = c.softcap > 0 ? scale * (1 - tanh_values[j] * tanh_values[j])
                                                  : scale;
          const double ds = probs[j] * (dp - row_d);
          const double ds_base = round_to(float(ds), c.fp16);
          const double p_base = round_to(float(probs[j]), c.fp16);
          const int64_t key_row = ((int64_t(b) * SK + j) * H + h) * D;
          for (int d = 0; d < D; ++d) {
            r.dq[row + d] += ds * dlogit_dqk * k.at(b, j, hk, d);
            r.dq_base[row + d] += ds_base * dlogit_dqk * k.at(b, j, hk, d);
            r.dk[key_row + d] += ds * dlogit_dqk * q.at(b, i, h, d);
            r.dk_base[key_row + d] += ds_base * dlogit_dqk * q.at(b, i, h, d);
            r.dv[key_row + d] += probs[j] * dout.at(b, i, h, d);
            r.dv_base[key_row + d] += p_base * dout.at(b, i, h, d);
          }
        }
      }
    }
  }
  return r;
}

struct Comparison {
  double max_error = 0, base_error = 0, max_ref = 0, rel_l2 = 0;
  bool finite = true;
  bool pass(bool fp16) const {
    const double floor = (fp16 ? std::ldexp(1.0, -10) : std::ldexp(1.0, -7)) * max_ref + 1e-5;
    return finite && max_error <= 3 * base_error + floor;
  }
};

Comparison compare(const std::vector<float>& got, const std::vector<double>& ref,
                   const std::vector<double>& base) {
  Comparison c;
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) c.finite = false;
    c.max_error = std::max(c.max_error, std::abs(got[i] - ref[i]));
    c.base_error = std::max(c.base_error, std::abs(base[i] - ref[i]));
    c.max_ref = std::max(c.max_ref, std::abs(ref[i]));
    err2 += (got[i] - ref[i]) * (got[i] - ref[i]);
    ref2 += ref[i] * ref[i];
  }
  c.rel_l2 = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  return c;
}

// Device buffers of one problem; gradients are contiguous [b, s, h, d].
struct DeviceProblem {
  BwdParams params{};
  std::vector<void*> allocations;
  int64_t dq_count = 0, dkv_count = 0, dq_accum_bytes = 0;

  void* alloc(int64_t bytes) {
    void* p = nullptr;
    CHECK_CUDA(cudaMalloc(&p, std::max<int64_t>(bytes, 16)));
    allocations.push_back(p);
    return p;
  }
  ~DeviceProblem() {
    for (void* p : allocations) cudaFree(p);
  }
  void poison_outputs() {
    CHECK_CUDA(cudaMemset(params.dq, 0xff, dq_count * 2));  // 0xffff is NaN in fp16 and bf16
    CHECK_CUDA(cudaMemset(params.dk, 0xff, dkv_count * 2));
    CHECK_CUDA(cudaMemset(params.dv, 0xff, dkv_count * 2));
    CHECK_CUDA(cudaMemset(params.dq_accum, 0xff, dq_accum_bytes));  // the kernels must zero it
  }
};

template <typename Element>
void setup_problem(DeviceProblem& p, const Case& c, const HostTensor& q, const HostTensor& k,
                   const HostTensor& v, const HostTensor& out, const HostTensor& dout,
                   const std::vector<float>& lse, const std::vector<float>& dlse, float scale) {
  BwdParams& a = p.params;
  a.q = upload<Element>(q);
  a.k = upload<Element>(k);
  a.v = upload<Element>(v);
  a.out = upload<Element>(out);
  a.dout = upload<Element>(dout);
  p.allocations.insert(p.allocations.end(), {const_cast<void*>(a.q), const_cast<void*>(a.k),
                                             const_cast<void*>(a.v), const_cast<void*>(a.out),
                                             const_cast<void*>(a.dout)});
  a.q_batch_stride = q.batch_stride(); a.q_row_stride = q.row_stride(); a.q_head_stride = c.head_dim;
  a.k_batch_stride = k.batch_stride(); a.k_row_stride = k.row_stride(); a.k_head_stride = c.head_dim;
  a.v_batch_stride = v.batch_stride(); a.v_row_stride = v.row_stride(); a.v_head_stride = c.head_dim;
  a.o_batch_stride = out.batch_stride(); a.o_row_stride = out.row_stride(); a.o_head_stride = c.head_dim;
  a.do_batch_stride = dout.batch_stride(); a.do_row_stride = dout.row_stride();
  a.do_head_stride = c.head_dim;
  a.batch = c.batch;
  a.seqlen_q = c.seqlen_q;
  a.seqlen_k = c.seqlen_k;
  a.heads = c.heads;
  a.kv_heads = c.kv_heads;
  a.head_dim = c.head_dim;
  a.head_dim_padded = bucket_for(c.head_dim);
  a.dtype = c.fp16 ? flash_jax::DType::kFloat16 : flash_jax::DType::kBFloat16;
  a.softmax_scale = scale;
  a.softmax_scale_log2 = scale * 1.4426950408889634f;
  a.causal = c.causal;
  a.causal_top_left = c.top_left;
  a.window_left = c.window_left;
  a.window_right = c.window_right;
  a.softcap = c.softcap;
  const int64_t rows_q = int64_t(c.batch) * c.heads * c.seqlen_q;
  float* lse_device = static_cast<float*>(p.alloc(rows_q * 4));
  CHECK_CUDA(cudaMemcpy(lse_device, lse.data(), rows_q * 4, cudaMemcpyHostToDevice));
  a.lse = lse_device;
  if (c.with_dlse) {
    float* dlse_device = static_cast<float*>(p.alloc(rows_q * 4));
    CHECK_CUDA(cudaMemcpy(dlse_device, dlse.data(), rows_q * 4, cudaMemcpyHostToDevice));
    a.dlse = dlse_device;
  }
  const int hd = c.head_dim;
  p.dq_count = int64_t(c.batch) * c.seqlen_q * c.heads * hd;
  p.dkv_count = int64_t(c.batch) * c.seqlen_k * c.heads * hd;
  a.dq = p.alloc(p.dq_count * 2);
  a.dk = p.alloc(p.dkv_count * 2);
  a.dv = p.alloc(p.dkv_count * 2);
  a.dq_batch_stride = int64_t(c.seqlen_q) * c.heads * hd; a.dq_row_stride = int64_t(c.heads) * hd;
  a.dq_head_stride = hd;
  a.dk_batch_stride = int64_t(c.seqlen_k) * c.heads * hd; a.dk_row_stride = int64_t(c.heads) * hd;
  a.dk_head_stride = hd;
  a.dv_batch_stride = a.dk_batch_stride; a.dv_row_stride = a.dk_row_stride; a.dv_head_stride = hd;
  const int64_t padded = (c.seqlen_q + 127) / 128 * 128;
  p.dq_accum_bytes = int64_t(c.batch) * c.heads * padded * a.head_dim_padded * 4;
  a.dq_accum = static_cast<float*>(p.alloc(p.dq_accum_bytes));
  a.softmax_d = static_cast<float*>(p.alloc(int64_t(c.batch) * c.heads * padded * 4));
  a.deterministic = c.deterministic;
}

bool run_case(const Case& c, std::mt19937& rng, cudaStream_t stream) {
  const float scale = 1.f / std::sqrt(float(c.head_dim));
  HostTensor q = make_tensor(c.batch, c.seqlen_q, c.heads, c.head_dim, c.row_padding, rng, c.fp16, 1.f);
  HostTensor k = make_tensor(c.batch, c.seqlen_k, c.kv_heads, c.head_dim, c.row_padding, rng, c.fp16, 1.f);
  HostTensor v = make_tensor(c.batch, c.seqlen_k, c.kv_heads, c.head_dim, c.row_padding, rng, c.fp16, 1.f);
  HostTensor dout = make_tensor(c.batch, c.seqlen_q, c.heads, c.head_dim, c.row_padding, rng, c.fp16, 1.f);
  std::vector<float> dlse(int64_t(c.batch) * c.heads * c.seqlen_q);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (float& x : dlse) x = normal(rng);
  Reference ref = reference(c, q, k, v, dout, dlse, scale);
  HostTensor out = make_tensor(c.batch, c.seqlen_q, c.heads, c.head_dim, c.row_padding, rng, c.fp16, 1.f);
  for (int b = 0; b < c.batch; ++b)
    for (int s = 0; s < c.seqlen_q; ++s)
      for (int h = 0; h < c.heads; ++h)
        for (int d = 0; d < c.head_dim; ++d)
          out.at(b, s, h, d) = ref.out[((int64_t(b) * c.seqlen_q + s) * c.heads + h) * c.head_dim + d];

  DeviceProblem problem;
  if (c.fp16) {
    setup_problem<cutlass::half_t>(problem, c, q, k, v, out, dout, ref.lse, dlse, scale);
  } else {
    setup_problem<cutlass::bfloat16_t>(problem, c, q, k, v, out, dout, ref.lse, dlse, scale);
  }
  problem.poison_outputs();
  std::string error = run_backward(problem.params, c.fp16, stream);
  if (!error.empty()) {
    std::printf("FAIL %-34s launch: %s\n", c.name, error.c_str());
    return false;
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  CHECK_CUDA(cudaGetLastError());
  auto fetch = [&](const void* ptr, int64_t n) {
    return c.fp16 ? download<cutlass::half_t>(ptr, n) : download<cutlass::bfloat16_t>(ptr, n);
  };
  std::vector<float> dq = fetch(problem.params.dq, problem.dq_count);
  std::vector<float> dk = fetch(problem.params.dk, problem.dkv_count);
  std::vector<float> dv = fetch(problem.params.dv, problem.dkv_count);

  // dk and dv stay per query head (the caller reduces GQA groups), as in the reference.
  const Comparison cq = compare(dq, ref.dq, ref.dq_base);
  const Comparison ck = compare(dk, ref.dk, ref.dk_base);
  const Comparison cv = compare(dv, ref.dv, ref.dv_base);
  bool ok = cq.pass(c.fp16) && ck.pass(c.fp16) && cv.pass(c.fp16);

  bool reproducible = true;
  if (c.deterministic) {
    for (int repeat = 0; repeat < 3 && reproducible; ++repeat) {
      problem.poison_outputs();
      error = run_backward(problem.params, c.fp16, stream);
      CHECK_CUDA(cudaStreamSynchronize(stream));
      std::vector<float> dq_again = fetch(problem.params.dq, problem.dq_count);
      reproducible = error.empty() && std::memcmp(dq_again.data(), dq.data(), dq.size() * 4) == 0;
    }
    ok = ok && reproducible;
  }
  std::printf("%s %-34s dq %.2e (base %.2e, rel %.1e)  dk %.2e (base %.2e, rel %.1e)  dv %.2e "
              "(base %.2e, rel %.1e)%s\n",
              ok ? "ok  " : "FAIL", c.name, cq.max_error, cq.base_error, cq.rel_l2, ck.max_error,
              ck.base_error, ck.rel_l2, cv.max_error, cv.base_error, cv.rel_l2,
              c.deterministic ? (reproducible ? "  bitwise-reproducible" : "  NOT REPRODUCIBLE")
                              : "");
  return ok;
}

int run_checks(bool small_only) {
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  // name, batch, sq, sk, heads, kv_heads, head_dim
  add({"d128 basic", 2, 256, 256, 2, 2, 128});
  add({"d128 causal", 1, 256, 256, 2, 2, 128, true});
  add({"d64 odd lengths", 1, 113, 203, 3, 3, 64});
  add({"d64 causal sq>sk (empty rows)", 1, 203, 113, 2, 2, 64, true});
  add({"d64 causal top-left sq<sk", 1, 113, 203, 2, 2, 64, true, true});
  add({"d40 (bucket 64) 1x239", 1, 1, 239, 2, 2, 40});
  add({"d40 (bucket 64) 239x1", 1, 239, 1, 2, 2, 40});
  add({"d32 gqa 9/3", 3, 97, 150, 9, 3, 32});
  add({"d96 window (32,16)", 1, 300, 300, 2, 1, 96, false, false, 32, 16});
  add({"d128 causal+window 64 softcap", 1, 333, 257, 2, 2, 128, true, false, 64, -1, 30.f});
  add({"d128 softcap dlse", 2, 190, 190, 2, 2, 128, false, false, -1, -1, 5.f, true});
  add({"d128 dlse causal", 1, 200, 260, 2, 2, 128, true, false, -1, -1, 0.f, true});
  add({"d192 odd", 1, 130, 77, 2, 2, 192});
  add({"d256 causal", 1, 200, 200, 2, 1, 256, true});
  add({"d120 (bucket 128) strided", 2, 150, 170, 2, 1, 120, false, false, -1, -1, 0.f, false,
       false, false, 24});
  add({"d64 causal 1023x1024", 1, 1023, 1024, 1, 1, 64, true});
  add({"fp16 d128 causal gqa", 2, 180, 180, 4, 2, 128, true, false, -1, -1, 0.f, false, false,
       true});
  add({"fp16 d64 softcap window", 1, 257, 300, 2, 2, 64, false, false, 40, 8, 20.f, false, false,
       true});
  add({"deterministic d128 causal", 2, 300, 300, 2, 2, 128, true, false, -1, -1, 0.f, false,
       true});
  add({"deterministic d64 gqa dlse", 1, 190, 250, 4, 1, 64, false, false, -1, -1, 0.f, true, true});
  add({"deterministic d256 softcap", 1, 130, 130, 2, 2, 256, false, false, -1, -1, 10.f, false,
       true});
  add({"deterministic fp16 d96 window", 1, 200, 180, 2, 2, 96, true, false, 50, -1, 0.f, false,
       true, true});
  add({"empty keys sk=0", 1, 70, 0, 2, 2, 64});
  add({"empty queries sq=0", 1, 0, 70, 2, 2, 64});
  int failures = 0;
  int skipped = 0;
  for (const Case& c : cases) {
    if (small_only && int64_t(c.seqlen_q) * c.seqlen_k > 100000) {
      ++skipped;
      continue;
    }
    failures += run_case(c, rng, stream) ? 0 : 1;
  }
  cases.resize(cases.size() - skipped);
  std::printf("%d of %zu cases failed\n", failures, cases.size());
  CHECK_CUDA(cudaStreamDestroy(stream));
  return failures == 0 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------
// Timing: b * s = 16384 tokens, h = 2048 / d, bf16, random inputs; lse set to a plausible value
// log(sk) + 0.5 so that probabilities are neither all 0 nor overflowing.
int run_timing(int only_head_dim) {
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::printf("backward only, bf16, median of 7 x 10 calls (CUDA events)\n");
  std::printf("%-4s %-7s %-6s %-10s %-10s %-10s\n", "d", "causal", "seq", "ms", "TFLOP/s",
              "det TFLOP/s");
  // One pool of random bf16 values on the device; each tensor copies a different window of it.
  const int64_t max_elems = int64_t(16384) * 2048;
  const int64_t pool_elems = max_elems + 5 * 4099;
  std::vector<cutlass::bfloat16_t> pool_host(pool_elems);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& x : pool_host) x = cutlass::bfloat16_t(normal(rng));
  void* pool = nullptr;
  CHECK_CUDA(cudaMalloc(&pool, pool_elems * 2));
  CHECK_CUDA(cudaMemcpy(pool, pool_host.data(), pool_elems * 2, cudaMemcpyHostToDevice));
  for (int head_dim : {64, 128}) {
    if (only_head_dim != 0 && head_dim != only_head_dim) continue;
    for (bool causal : {false, true}) {
      for (int seq : {512, 1024, 2048, 4096, 8192, 16384}) {
        const int batch = 16384 / seq, heads = 2048 / head_dim;
        const int64_t elems = int64_t(batch) * seq * heads * head_dim;
        DeviceProblem p;
        BwdParams& a = p.params;
        void* tensors[5];
        for (int t = 0; t < 5; ++t) {
          tensors[t] = p.alloc(elems * 2);
          CHECK_CUDA(cudaMemcpy(tensors[t], static_cast<char*>(pool) + t * 4099 * 2, elems * 2,
                                cudaMemcpyDeviceToDevice));
        }
        a.q = tensors[0]; a.k = tensors[1]; a.v = tensors[2]; a.out = tensors[3]; a.dout = tensors[4];
        const int64_t row = int64_t(heads) * head_dim, bs = row * seq;
        a.q_batch_stride = a.k_batch_stride = a.v_batch_stride = a.o_batch_stride = bs;
        a.do_batch_stride = a.dq_batch_stride = a.dk_batch_stride = a.dv_batch_stride = bs;
        a.q_row_stride = a.k_row_stride = a.v_row_stride = a.o_row_stride = row;
        a.do_row_stride = a.dq_row_stride = a.dk_row_stride = a.dv_row_stride = row;
        a.q_head_stride = a.k_head_stride = a.v_head_stride = a.o_head_stride = head_dim;
        a.do_head_stride = a.dq_head_stride = a.dk_head_stride = a.dv_head_stride = head_dim;
        a.batch = batch; a.seqlen_q = seq; a.seqlen_k = seq; a.heads = heads; a.kv_heads = heads;
        a.head_dim = head_dim; a.head_dim_padded = head_dim;
        a.dtype = flash_jax::DType::kBFloat16;
        a.softmax_scale = 1.f / std::sqrt(float(head_dim));
        a.softmax_scale_log2 = a.softmax_scale * 1.4426950408889634f;
        a.causal = causal; a.window_left = -1; a.window_right = -1;
        std::vector<float> lse(int64_t(batch) * heads * seq, std::log(float(seq)) + 0.5f);
        float* lse_device = static_cast<float*>(p.alloc(lse.size() * 4));
        CHECK_CUDA(cudaMemcpy(lse_device, lse.data(), lse.size() * 4, cudaMemcpyHostToDevice));
        a.lse = lse_device;
        a.dq = p.alloc(elems * 2); a.dk = p.alloc(elems * 2); a.dv = p.alloc(elems * 2);
        a.dq_accum = static_cast<float*>(p.alloc(elems * 4));
        a.softmax_d = static_cast<float*>(p.alloc(int64_t(batch) * heads * seq * 4));
        double flops = 10.0 * batch * seq * double(seq) * heads * head_dim * (causal ? 0.5 : 1.0);
        double tflops[2];
        double ms_atomic = 0;
        for (int det = 0; det < 2; ++det) {
          a.deterministic = det == 1;
          for (int w = 0; w < 3; ++w) {
            std::string e = run_backward(a, false, stream);
            if (!e.empty()) { std::printf("error %s\n", e.c_str()); return 1; }
          }
          std::vector<float> times;
          for (int rep = 0; rep < 7; ++rep) {
            CHECK_CUDA(cudaEventRecord(start, stream));
            for (int it = 0; it < 10; ++it) run_backward(a, false, stream);
            CHECK_CUDA(cudaEventRecord(stop, stream));
            CHECK_CUDA(cudaEventSynchronize(stop));
            float ms;
            CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
            times.push_back(ms / 10);
          }
          std::sort(times.begin(), times.end());
          tflops[det] = flops / (times[3] * 1e-3) / 1e12;
          if (det == 0) ms_atomic = times[3];
        }
        std::printf("%-4d %-7d %-6d %-10.3f %-10.1f %-10.1f\n", head_dim, int(causal), seq,
                    ms_atomic, tflops[0], tflops[1]);
      }
    }
  }
  CHECK_CUDA(cudaFree(pool));
  CHECK_CUDA(cudaGetLastError());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--time") return run_timing(argc > 2 ? std::atoi(argv[2]) : 0);
  return run_checks(/*small_only=*/mode == "--small");
}
