// Standalone check of the sm80 forward kernels (launch_fwd, split-KV included) against a CPU
// fp64 reference, and timing modes. Links against csrc/instantiations/fwd_*.cu objects (no JAX,
// no FFI); the --sweep mode also needs csrc/tests/fwd_variants.cu objects (build_fwd_check.sh).
//
//   fwd_check            correctness cases; exit status 1 if any fails
//   fwd_check --time     forward TFLOP/s on the grid b * s = 16384, h = 2048 / d
//   fwd_check --sweep    TFLOP/s of alternative tile shapes (FWD_VARIANTS), checked against launch_fwd
//   fwd_check --profile D  three launches at bf16 s 4096, head dim D (for ncu)
//
// Oracle (DESIGN.md section 6): `ref` is attention in fp64 on the inputs the kernel sees, `base`
// the same with P rounded to the input dtype before P V and the output rounded (what the kernel
// does). out passes when max|out - ref| <= 2 * max|base - ref| + floor (floor: one rounding step
// of the dtype at the output's magnitude), lse when |lse - ref| <= 1e-3 * (1 + |ref|). Softcap
// runs through tanh.approx (relative error ~2^-11), so its cases get that error's effect on top.
// Fully masked rows must give out = 0 and lse = -inf. Outputs are poisoned (NaN) before each run
// and out has 8 extra elements per head: every valid element must be written, the padding never.
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
#include "fwd_variants.h"

namespace {

using flash_jax_check::bucket_for;
using flash_jax_check::round_to;

using flash_jax::FwdParams;

struct Case {
  const char* name;
  int batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim;
  bool causal = false;
  bool top_left = false;
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  int num_splits = 1;
  bool fp16 = false;
  bool packed_qkv = false;  // q, k, v interleaved in one [b, s, 3, h, d] buffer (sq == sk, h == kv_h)
};

template <typename Element>
std::string run_bucket(const FwdParams& params, cudaStream_t stream) {
  switch (params.head_dim_padded) {
    case 32: return flash_jax::launch_fwd<Element, 32>(params, stream);
    case 64: return flash_jax::launch_fwd<Element, 64>(params, stream);
    case 96: return flash_jax::launch_fwd<Element, 96>(params, stream);
    case 128: return flash_jax::launch_fwd<Element, 128>(params, stream);
    case 192: return flash_jax::launch_fwd<Element, 192>(params, stream);
    case 256: return flash_jax::launch_fwd<Element, 256>(params, stream);
  }
  return "no bucket";
}

std::string run_forward(const FwdParams& params, bool fp16, cudaStream_t stream) {
  return fp16 ? run_bucket<cutlass::half_t>(params, stream)
              : run_bucket<cutlass::bfloat16_t>(params, stream);
}

uint16_t to_bits(float x, bool fp16) {
  return fp16 ? cutlass::half_t(x).raw() : cutlass::bfloat16_t(x).raw();
}

float from_bits(uint16_t bits, bool fp16) {
  return fp16 ? static_cast<float>(cutlass::half_t::bitcast(bits))
              : static_cast<float>(cutlass::bfloat16_t::bitcast(bits));
}

// One rounding step of the dtype at magnitude x.
double ulp(double x, bool fp16) {
  int exponent;
  std::frexp(std::max(x, 1e-30), &exponent);
  return std::ldexp(1.0, exponent - (fp16 ? 11 : 8));
}

struct HostTensors {
  std::vector<float> q, k, v;  // [b, s, h, d] logical, rounded to the dtype
};

bool run_case(const Case& c, uint64_t seed) {
  const bool fp16 = c.fp16;
  const int b = c.batch, sq = c.seqlen_q, sk = c.seqlen_k, h = c.heads, hk = c.kv_heads, d = c.head_dim;
  const int out_head_alloc = d + 8;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);

  // Device layouts: strides in elements.
  int64_t q_rs, q_hs, q_bs, k_rs, k_hs, k_bs;
  size_t q_elems, k_elems;
  if (c.packed_qkv) {
    q_rs = k_rs = 3LL * h * d;
    q_hs = k_hs = d;
    q_bs = k_bs = static_cast<int64_t>(sq) * q_rs;
    q_elems = k_elems = static_cast<size_t>(b) * q_bs;
  } else {
    q_rs = static_cast<int64_t>(h) * d;
    q_hs = d;
    q_bs = static_cast<int64_t>(sq) * q_rs;
    k_rs = static_cast<int64_t>(hk) * d;
    k_hs = d;
    k_bs = static_cast<int64_t>(sk) * k_rs;
    q_elems = static_cast<size_t>(b) * q_bs;
    k_elems = static_cast<size_t>(b) * k_bs;
  }
  HostTensors host;
  host.q.resize(static_cast<size_t>(b) * sq * h * d);
  host.k.resize(static_cast<size_t>(b) * sk * hk * d);
  host.v.resize(host.k.size());
  std::vector<uint16_t> q_bits, k_bits, v_bits;
  auto fill = [&](std::vector<float>& logical, std::vector<uint16_t>& bits, int s, int heads,
                  int64_t bs, int64_t rs, int64_t hs) {
    for (int bi = 0; bi < b; ++bi)
      for (int si = 0; si < s; ++si)
        for (int hi = 0; hi < heads; ++hi)
          for (int di = 0; di < d; ++di) {
            float x = round_to(uniform(rng), fp16);
            logical[((static_cast<size_t>(bi) * s + si) * heads + hi) * d + di] = x;
            bits[bi * bs + si * rs + hi * hs + di] = to_bits(x, fp16);
          }
  };
  std::vector<uint16_t> packed;
  if (c.packed_qkv) {
    packed.assign(q_elems, 0);
    fill(host.q, packed, sq, h, q_bs, q_rs, q_hs);
    std::vector<uint16_t> tmp(q_elems);
    fill(host.k, tmp, sk, hk, k_bs, k_rs, k_hs);
    for (int bi = 0; bi < b; ++bi)
      for (int si = 0; si < sk; ++si)
        for (int hi = 0; hi < hk; ++hi)
          for (int di = 0; di < d; ++di) packed[bi * k_bs + si * k_rs + h * d + hi * k_hs + di] = tmp[bi * k_bs + si * k_rs + hi * k_hs + di];
    fill(host.v, tmp, sk, hk, k_bs, k_rs, k_hs);
    for (int bi = 0; bi < b; ++bi)
      for (int si = 0; si < sk; ++si)
        for (int hi = 0; hi < hk; ++hi)
          for (int di = 0; di < d; ++di) packed[bi * k_bs + si * k_rs + 2 * h * d + hi * k_hs + di] = tmp[bi * k_bs + si * k_rs + hi * k_hs + di];
  } else {
    q_bits.resize(q_elems);
    k_bits.resize(k_elems);
    v_bits.resize(k_elems);
    fill(host.q, q_bits, sq, h, q_bs, q_rs, q_hs);
    fill(host.k, k_bits, sk, hk, k_bs, k_rs, k_hs);
    fill(host.v, v_bits, sk, hk, k_bs, k_rs, k_hs);
  }

  const size_t out_elems = static_cast<size_t>(b) * sq * h * out_head_alloc;
  const size_t lse_elems = static_cast<size_t>(b) * h * sq;
  void *dq, *dk, *dv, *dout;
  float *dlse, *dout_accum = nullptr, *dlse_accum = nullptr;
  uint16_t* dpacked = nullptr;
  if (c.packed_qkv) {
    CHECK_CUDA(cudaMalloc(&dpacked, q_elems * 2));
    CHECK_CUDA(cudaMemcpy(dpacked, packed.data(), q_elems * 2, cudaMemcpyHostToDevice));
    dq = dpacked;
    dk = dpacked + h * d;
    dv = dpacked + 2 * h * d;
  } else {
    CHECK_CUDA(cudaMalloc(&dq, q_elems * 2));
    CHECK_CUDA(cudaMalloc(&dk, k_elems * 2));
    CHECK_CUDA(cudaMalloc(&dv, k_elems * 2));
    CHECK_CUDA(cudaMemcpy(dq, q_bits.data(), q_elems * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dk, k_bits.data(), k_elems * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dv, v_bits.data(), k_elems * 2, cudaMemcpyHostToDevice));
  }
  CHECK_CUDA(cudaMalloc(&dout, out_elems * 2));
  CHECK_CUDA(cudaMalloc(&dlse, lse_elems * 4));
  CHECK_CUDA(cudaMemset(dout, 0xff, out_elems * 2));  // NaN in fp16 and bf16
  CHECK_CUDA(cudaMemset(dlse, 0xff, lse_elems * 4));  // NaN in fp32
  const int bucket = bucket_for(d);
  if (c.num_splits > 1) {
    CHECK_CUDA(cudaMalloc(&dout_accum, lse_elems * c.num_splits * bucket * 4));
    CHECK_CUDA(cudaMalloc(&dlse_accum, lse_elems * c.num_splits * 4));
    CHECK_CUDA(cudaMemset(dout_accum, 0xff, lse_elems * c.num_splits * bucket * 4));
    CHECK_CUDA(cudaMemset(dlse_accum, 0xff, lse_elems * c.num_splits * 4));
  }

  FwdParams p{};
  p.q = dq;
  p.k = dk;
  p.v = dv;
  p.q_batch_stride = q_bs, p.q_row_stride = q_rs, p.q_head_stride = q_hs;
  p.k_batch_stride = k_bs, p.k_row_stride = k_rs, p.k_head_stride = k_hs;
  p.v_batch_stride = k_bs, p.v_row_stride = k_rs, p.v_head_stride = k_hs;
  p.batch = b, p.seqlen_q = sq, p.seqlen_k = sk, p.heads = h, p.kv_heads = hk;
  p.head_dim = d, p.head_dim_padded = bucket;
  p.dtype = fp16 ? flash_jax::DType::kFloat16 : flash_jax::DType::kBFloat16;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  p.softmax_scale = scale;
  p.softmax_scale_log2 = scale * 1.4426950408889634f;
  p.causal = c.causal, p.causal_top_left = c.top_left;
  p.window_left = c.window_left, p.window_right = c.window_right;
  p.softcap = c.softcap;
  p.out = dout;
  p.o_row_stride = static_cast<int64_t>(h) * out_head_alloc;
  p.o_head_stride = out_head_alloc;
  p.o_batch_stride = static_cast<int64_t>(sq) * p.o_row_stride;
  p.lse = dlse;
  p.num_splits = c.num_splits;
  p.out_accum = dout_accum;
  p.lse_accum = dlse_accum;

  std::string error = run_forward(p, fp16, nullptr);
  if (!error.empty()) {
    std::printf("FAIL %-34s launch: %s\n", c.name, error.c_str());
    return false;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> out_bits(out_elems);
  std::vector<float> lse(lse_elems);
  CHECK_CUDA(cudaMemcpy(out_bits.data(), dout, out_elems * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(lse.data(), dlse, lse_elems * 4, cudaMemcpyDeviceToHost));

  // Reference.
  const int group = h / hk;
  const int offset = c.top_left ? 0 : sk - sq;
  double max_err = 0, max_base_err = 0, max_ref = 0, max_lse_excess = 0;
  bool bad = false;
  int64_t padding_written = 0, masked_rows = 0;
  std::vector<double> scores(sk), probs(sk);
  for (int bi = 0; bi < b; ++bi)
    for (int hi = 0; hi < h; ++hi)
      for (int i = 0; i < sq; ++i) {
        const float* qrow = &host.q[((static_cast<size_t>(bi) * sq + i) * h + hi) * d];
        double row_max = -INFINITY;
        for (int j = 0; j < sk; ++j) {
          bool allowed = true;
          if (c.causal && j > i + offset) allowed = false;
          if (c.window_left >= 0 && j < i + offset - c.window_left) allowed = false;
          if (c.window_right >= 0 && j > i + offset + c.window_right) allowed = false;
          if (!allowed) {
            scores[j] = -INFINITY;
            continue;
          }
          const float* krow = &host.k[((static_cast<size_t>(bi) * sk + j) * hk + hi / group) * d];
          double dot = 0;
          for (int di = 0; di < d; ++di) dot += static_cast<double>(qrow[di]) * krow[di];
          double logit = dot * scale;
          if (c.softcap > 0) logit = c.softcap * std::tanh(logit / c.softcap);
          scores[j] = logit;
          row_max = std::max(row_max, logit);
        }
        const size_t out_base = ((static_cast<size_t>(bi) * sq + i) * h + hi) * out_head_alloc;
        const float lse_kernel = lse[(static_cast<size_t>(bi) * h + hi) * sq + i];
        for (int di = d; di < out_head_alloc; ++di) padding_written += out_bits[out_base + di] != 0xffff;
        if (row_max == -INFINITY) {
          ++masked_rows;
          if (!(lse_kernel == -INFINITY)) bad = true;
          for (int di = 0; di < d; ++di) {
            if (from_bits(out_bits[out_base + di], fp16) != 0.f) bad = true;
          }
          continue;
        }
        double sum = 0;
        for (int j = 0; j < sk; ++j) {
          probs[j] = scores[j] == -INFINITY ? 0.0 : std::exp(scores[j] - row_max);
          sum += probs[j];
        }
        const double lse_ref = row_max + std::log(sum);
        const double lse_tol = 1e-3 * (1 + std::fabs(lse_ref)) + (c.softcap > 0 ? 4e-3 * c.softcap : 0);
        if (!(std::fabs(lse_kernel - lse_ref) <= lse_tol)) {
          bad = true;
          max_lse_excess = std::max(max_lse_excess, std::fabs(lse_kernel - lse_ref));
        }
        // base: P rounded to the dtype before P V, output rounded, as in the kernel.
        for (int di = 0; di < d; ++di) {
          double acc = 0, acc_base = 0;
          for (int j = 0; j < sk; ++j) {
            if (probs[j] == 0.0) continue;
            const double vv = host.v[((static_cast<size_t>(bi) * sk + j) * hk + hi / group) * d + di];
            acc += probs[j] * vv;
            acc_base += round_to(static_cast<float>(probs[j]), fp16) * vv;
          }
          const double ref = acc / sum;
          const double base = round_to(static_cast<float>(acc_base / sum), fp16);
          const float got = from_bits(out_bits[out_base + di], fp16);
          if (std::isnan(got)) bad = true;
          max_err = std::max(max_err, std::fabs(got - ref));
          max_base_err = std::max(max_base_err, std::fabs(base - ref));
          max_ref = std::max(max_ref, std::fabs(ref));
        }
      }
  const double softcap_term = c.softcap > 0 ? 1e-2 * max_ref : 0.0;
  const double tolerance = 2 * max_base_err + ulp(max_ref, fp16) + softcap_term;
  const bool pass = !bad && max_err <= tolerance && padding_written == 0;
  std::printf("%s %-34s max|out-ref| %.3e  max|base-ref| %.3e  tol %.3e  masked rows %lld%s%s\n",
              pass ? "ok  " : "FAIL", c.name, max_err, max_base_err, tolerance,
              static_cast<long long>(masked_rows), padding_written ? "  PADDING WRITTEN" : "",
              max_lse_excess > 0 ? "  LSE" : (bad ? "  NaN/unwritten/masked-row" : ""));
  if (c.packed_qkv) {
    CHECK_CUDA(cudaFree(dpacked));
  } else {
    CHECK_CUDA(cudaFree(dq));
    CHECK_CUDA(cudaFree(dk));
    CHECK_CUDA(cudaFree(dv));
  }
  CHECK_CUDA(cudaFree(dout));
  CHECK_CUDA(cudaFree(dlse));
  if (dout_accum) CHECK_CUDA(cudaFree(dout_accum));
  if (dlse_accum) CHECK_CUDA(cudaFree(dlse_accum));
  return pass;
}

int run_correctness() {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  //   name                          b   sq    sk   h  kvh  d
  add({"bf16 d128 square", 2, 256, 256, 4, 4, 128});
  add({"fp16 d128 square", 2, 256, 256, 4, 4, 128, false, false, -1, -1, 0.f, 1, true});
  add({"bf16 d128 causal tail", 2, 257, 257, 3, 3, 128, true});
  add({"fp16 d64 causal gqa 113x203", 3, 113, 203, 9, 3, 64, true, false, -1, -1, 0.f, 1, true});
  add({"bf16 d64 239x1", 1, 239, 1, 2, 2, 64});
  add({"bf16 d64 1x239", 3, 1, 239, 2, 1, 64});
  add({"bf16 d64 causal 1023x1024", 1, 1023, 1024, 2, 2, 64, true});
  add({"bf16 d128 causal sq>sk (masked rows)", 2, 300, 100, 2, 2, 128, true});
  add({"fp16 d128 causal top-left 100x300", 2, 100, 300, 2, 1, 128, true, true, -1, -1, 0.f, 1, true});
  add({"bf16 d128 causal top-left 300x100", 1, 300, 100, 2, 2, 128, true, true});
  add({"bf16 d128 window (32,16)", 2, 400, 400, 2, 2, 128, false, false, 32, 16});
  add({"bf16 d64 causal window left 64", 2, 500, 700, 2, 2, 64, true, false, 64, -1});
  add({"fp16 d64 window (0,0) top-left", 1, 300, 200, 2, 2, 64, false, true, 0, 0, 0.f, 1, true});
  add({"bf16 d128 softcap 30", 2, 300, 300, 2, 2, 128, false, false, -1, -1, 30.f});
  add({"bf16 d128 causal softcap 5", 1, 300, 300, 2, 2, 128, true, false, -1, -1, 5.f});
  add({"bf16 d40 (bucket 64)", 2, 200, 150, 3, 3, 40});
  add({"fp16 d24 (bucket 32) causal", 2, 200, 150, 3, 3, 24, true, false, -1, -1, 0.f, 1, true});
  add({"bf16 d96", 2, 190, 260, 2, 2, 96, true});
  add({"bf16 d160 (bucket 192)", 1, 190, 260, 2, 2, 160});
  add({"bf16 d192 causal", 1, 260, 260, 2, 2, 192, true});
  add({"bf16 d200 (bucket 256)", 1, 190, 260, 2, 2, 200});
  add({"fp16 d256 causal", 1, 260, 260, 2, 2, 256, true, false, -1, -1, 0.f, 1, true});
  add({"bf16 d128 packed qkv causal", 2, 200, 200, 3, 3, 128, true, false, -1, -1, 0.f, 1, false, true});
  add({"bf16 d128 split 8 decode 1x4000", 1, 1, 4000, 8, 2, 128, false, false, -1, -1, 0.f, 8});
  add({"fp16 d64 split 5 causal 16x3000", 2, 16, 3000, 4, 4, 64, true, false, -1, -1, 0.f, 5, true});
  add({"bf16 d128 split 7 window (empty splits)", 1, 40, 2000, 4, 2, 128, true, false, 100, -1, 0.f, 7});
  add({"bf16 d256 split 3 softcap", 1, 5, 1000, 4, 4, 256, false, false, -1, -1, 20.f, 3});
  add({"bf16 d32 split 4 sq>sk causal", 1, 70, 50, 2, 2, 32, true, false, -1, -1, 0.f, 4});
  int failures = 0;
  uint64_t seed = 1234;
  for (const Case& c : cases) failures += !run_case(c, seed++);
  std::printf("%d of %zu forward cases failed\n", failures, cases.size());
  return failures == 0 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------
// Timing.

__global__ void fill_random(uint16_t* data, size_t n, uint32_t seed, bool fp16) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    const float u = (x & 0xffffff) / 16777216.f * 2.f - 1.f;
    data[i] = fp16 ? cutlass::half_t(u).raw() : cutlass::bfloat16_t(u).raw();
  }
}

struct Problem {
  int batch, seqlen, heads, head_dim;
  bool causal, fp16;
};

struct DeviceBuffers {
  uint16_t *q, *k, *v, *out;
  float* lse;
  size_t elems;
};

DeviceBuffers allocate(size_t elems, size_t lse_elems) {
  DeviceBuffers buffers;
  buffers.elems = elems;
  CHECK_CUDA(cudaMalloc(&buffers.q, elems * 2));
  CHECK_CUDA(cudaMalloc(&buffers.k, elems * 2));
  CHECK_CUDA(cudaMalloc(&buffers.v, elems * 2));
  CHECK_CUDA(cudaMalloc(&buffers.out, elems * 2));
  CHECK_CUDA(cudaMalloc(&buffers.lse, lse_elems * 4));
  return buffers;
}

FwdParams make_params(const Problem& pr, const DeviceBuffers& buffers) {
  FwdParams p{};
  const int64_t row = static_cast<int64_t>(pr.heads) * pr.head_dim;
  p.q = buffers.q, p.k = buffers.k, p.v = buffers.v, p.out = buffers.out, p.lse = buffers.lse;
  for (int64_t* s : {&p.q_row_stride, &p.k_row_stride, &p.v_row_stride, &p.o_row_stride}) *s = row;
  for (int64_t* s : {&p.q_head_stride, &p.k_head_stride, &p.v_head_stride, &p.o_head_stride}) *s = pr.head_dim;
  for (int64_t* s : {&p.q_batch_stride, &p.k_batch_stride, &p.v_batch_stride, &p.o_batch_stride}) *s = row * pr.seqlen;
  p.batch = pr.batch, p.seqlen_q = pr.seqlen, p.seqlen_k = pr.seqlen;
  p.heads = pr.heads, p.kv_heads = pr.heads;
  p.head_dim = pr.head_dim, p.head_dim_padded = pr.head_dim;
  p.dtype = pr.fp16 ? flash_jax::DType::kFloat16 : flash_jax::DType::kBFloat16;
  p.softmax_scale = 1.f / std::sqrt(static_cast<float>(pr.head_dim));
  p.softmax_scale_log2 = p.softmax_scale * 1.4426950408889634f;
  p.causal = pr.causal;
  p.window_left = p.window_right = -1;
  p.num_splits = 1;
  return p;
}

template <typename Launch>
double median_ms(Launch&& launch, int iterations) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    launch();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return times[times.size() / 2];
}

double tflops(const Problem& pr, double ms) {
  double flops = 4.0 * pr.batch * pr.seqlen * static_cast<double>(pr.seqlen) * pr.heads * pr.head_dim;
  if (pr.causal) flops /= 2;
  return flops / (ms * 1e-3) / 1e12;
}

int run_timing() {
  const size_t elems = 16384ULL * 2048;
  DeviceBuffers buffers = allocate(elems, 16384ULL * 64);
  for (bool fp16 : {false, true}) {
    fill_random<<<1024, 256>>>(buffers.q, elems, 1, fp16);
    fill_random<<<1024, 256>>>(buffers.k, elems, 2, fp16);
    fill_random<<<1024, 256>>>(buffers.v, elems, 3, fp16);
    CHECK_CUDA(cudaDeviceSynchronize());
    for (int d : {64, 128}) {
      for (bool causal : {false, true}) {
        std::printf("%s d=%d causal=%d forward TFLOP/s |", fp16 ? "fp16" : "bf16", d, causal);
        for (int s : {512, 1024, 2048, 4096, 8192, 16384}) {
          Problem pr{16384 / s, s, 2048 / d, d, causal, fp16};
          FwdParams p = make_params(pr, buffers);
          std::string error;
          double ms = median_ms([&] { error = run_forward(p, fp16, nullptr); }, 30);
          if (!error.empty()) {
            std::printf(" error: %s\n", error.c_str());
            return 1;
          }
          std::printf(" %d: %.0f |", s, tflops(pr, ms));
        }
        std::printf("\n");
      }
    }
  }
  // Decoding shape through split-KV: batch 2, 16 heads, 1 query, 8192 keys, d 128.
  for (int splits : {1, 4, 16, 32}) {
    Problem pr{2, 8192, 16, 128, false, false};
    FwdParams p = make_params(pr, buffers);
    p.seqlen_q = 1;
    p.q_batch_stride = p.o_batch_stride = p.q_row_stride;
    p.num_splits = splits;
    float *out_accum, *lse_accum;
    CHECK_CUDA(cudaMalloc(&out_accum, static_cast<size_t>(splits) * 2 * 16 * 128 * 4));
    CHECK_CUDA(cudaMalloc(&lse_accum, static_cast<size_t>(splits) * 2 * 16 * 4));
    p.out_accum = out_accum, p.lse_accum = lse_accum;
    std::string error;
    double ms = median_ms([&] { error = run_forward(p, false, nullptr); }, 50);
    const double bytes = 2.0 * 2 * 8192 * 16 * 128 * 2;
    std::printf("decode b2 h16 sq1 sk8192 d128 bf16 num_splits %2d: %.1f us, %.0f GB/s K+V %s\n",
                splits, ms * 1e3, bytes / (ms * 1e-3) / 1e9, error.c_str());
    CHECK_CUDA(cudaFree(out_accum));
    CHECK_CUDA(cudaFree(lse_accum));
  }
  return 0;
}

int run_sweep() {
  const size_t elems = 16384ULL * 2048;
  DeviceBuffers buffers = allocate(elems, 16384ULL * 64);
  uint16_t* reference_out;
  CHECK_CUDA(cudaMalloc(&reference_out, elems * 2));
  fill_random<<<1024, 256>>>(buffers.q, elems, 11, false);
  fill_random<<<1024, 256>>>(buffers.k, elems, 12, false);
  fill_random<<<1024, 256>>>(buffers.v, elems, 13, false);
  CHECK_CUDA(cudaDeviceSynchronize());
  for (const FwdVariant& variant : fwd_variants()) {
    for (bool causal : {false, true}) {
      std::printf("variant d%d %dx%d %dw causal=%d |", variant.head_dim, variant.block_m,
                  variant.block_n, variant.warps, causal);
      for (int s : {1024, 4096, 16384}) {
        Problem pr{16384 / s, s, 2048 / variant.head_dim, variant.head_dim, causal, false};
        FwdParams p = make_params(pr, buffers);
        p.out = reference_out;
        std::string error = run_forward(p, false, nullptr);
        p.out = buffers.out;
        CHECK_CUDA(cudaMemset(buffers.out, 0xff, elems * 2));
        if (error.empty()) error = variant.launch(p, nullptr);
        CHECK_CUDA(cudaDeviceSynchronize());
        // Same inputs, same arithmetic up to the block order: compare with launch_fwd's output.
        std::vector<uint16_t> a(elems), bv(elems);
        CHECK_CUDA(cudaMemcpy(a.data(), reference_out, elems * 2, cudaMemcpyDeviceToHost));
        CHECK_CUDA(cudaMemcpy(bv.data(), buffers.out, elems * 2, cudaMemcpyDeviceToHost));
        double max_diff = 0;
        for (size_t i = 0; i < elems; i += 7) {
          const double diff = std::fabs(from_bits(a[i], false) - from_bits(bv[i], false));
          max_diff = std::isnan(diff) ? INFINITY : std::max(max_diff, diff);
        }
        double ms = median_ms([&] { error = variant.launch(p, nullptr); }, 20);
        std::printf(" %d: %.0f (diff %.1e) |", s, tflops(pr, ms), max_diff);
        if (!error.empty()) std::printf(" error: %s", error.c_str());
      }
      std::printf("\n");
    }
  }
  return 0;
}

}  // namespace

// A few launches of one grid point (bf16, s 4096, non-causal, head dim d) for a profiler.
int run_profile(int head_dim) {
  const size_t elems = 16384ULL * 2048;
  DeviceBuffers buffers = allocate(elems, 16384ULL * 64);
  fill_random<<<1024, 256>>>(buffers.q, elems, 21, false);
  fill_random<<<1024, 256>>>(buffers.k, elems, 22, false);
  fill_random<<<1024, 256>>>(buffers.v, elems, 23, false);
  Problem pr{4, 4096, 2048 / head_dim, head_dim, false, false};
  FwdParams p = make_params(pr, buffers);
  for (int i = 0; i < 3; ++i) {
    std::string error = run_forward(p, false, nullptr);
    if (!error.empty()) {
      std::printf("error: %s\n", error.c_str());
      return 1;
    }
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 2 && std::strcmp(argv[1], "--profile") == 0) return run_profile(std::atoi(argv[2]));
  if (argc > 1 && std::strcmp(argv[1], "--time") == 0) return run_timing();
  if (argc > 1 && std::strcmp(argv[1], "--sweep") == 0) return run_sweep();
  return run_correctness();
}
