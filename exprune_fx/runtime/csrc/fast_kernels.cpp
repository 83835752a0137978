// Fast CPU kernels for linear-like ExPrune sites (float32), built on first use by
// exprune_fx/runtime/fast.py. Semantics are those of the reference kernels in kernels.py:
// the same terms, tests, decisions and counters; only the work done differs. Each output
// (row i, feature j) reads the first k terms of its weight row, is tested, and reads the rest of
// the row only when it survives, so the work is proportional to the surviving outputs.
//
// Layouts: x [M, K] row-major and contiguous; the weight [N, K] with unit stride along K and
// any row stride (the rewrite made every term's `unit` elements contiguous); its first k*unit
// columns are the "head", the rest the "rest"; head_t is the head transposed (HeadT below), which
// the kernels read 16 outputs at a time. offset is [M, N] with any strides (0 for
// broadcast) or empty. Counters are the float64 vector of counters.py, updated in place.
// Threads: at::parallel_for over blocks of outputs (compiled with -fopenmp, sharing torch's
// OpenMP runtime).
//
// Convolution sites: conv_kernels.cpp (compiled after this file, in one translation unit with
// it and bindings.cpp).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>  // conv_kernels.cpp's sqrt_lanes
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 16 float lanes (GCC/Clang vector extension: one AVX-512 register, two AVX2 ones, ...).
constexpr int64_t kLanes = 16;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
// The same lanes at any float's address (loads and stores through it need no alignment).
typedef float LanesAt __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));

inline Lanes load(const float* p) { return *reinterpret_cast<const LanesAt*>(p); }

// One vector accumulator per 16 lanes: `omp simd` lets the compiler reassociate the sum.
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Four dot products of `w` with four vectors: `w` is loaded once for the four, and the four are
// read side by side (four memory streams).
inline void dot4(const float* w, const float* x0, const float* x1, const float* x2, const float* x3, int64_t n,
                 float* out) {
  constexpr int L = 16;
  float a0[L] = {0}, a1[L] = {0}, a2[L] = {0}, a3[L] = {0};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) {
      const float v = w[i + l];
      a0[l] += v * x0[i + l];
      a1[l] += v * x1[i + l];
      a2[l] += v * x2[i + l];
      a3[l] += v * x3[i + l];
    }
  }
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (; i < n; ++i) {
    s0 += w[i] * x0[i], s1 += w[i] * x1[i], s2 += w[i] * x2[i], s3 += w[i] * x3[i];
  }
  for (int l = 0; l < L; ++l) s0 += a0[l], s1 += a1[l], s2 += a2[l], s3 += a3[l];
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

// Sum and sum of squares of `terms` terms of `unit` elements each.
inline void term_sums(const float* x, const float* w, int64_t terms, int64_t unit, bool squares, float& s1,
                      float& s2) {
  if (!squares) {
    s1 += dot(x, w, terms * unit);
    return;
  }
  if (unit == 1) {
    float a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t t = 0; t < terms; ++t) {
      const float v = x[t] * w[t];
      a += v;
      b += v * v;
    }
    s1 += a, s2 += b;
    return;
  }
  for (int64_t t = 0; t < terms; ++t) {
    const float v = dot(x + t * unit, w + t * unit, unit);
    s1 += v;
    s2 += v * v;
  }
}

enum { kCalls, kOutputs, kPruned, kDense, kPartial, kTest, kRemainder, kComputed, kNegative, kUntested, kFields };

// A site's counters (counters.py): float64, contiguous, on the CPU, one slot per field. Checked on
// every write: a short vector would be written past its end.
double* counter_slots(const at::Tensor& counters) {
  TORCH_CHECK(counters.device().is_cpu() && counters.scalar_type() == at::kDouble && counters.is_contiguous() &&
                  counters.numel() == kFields,
              "exprune counters must be a contiguous float64 CPU vector of ", static_cast<int>(kFields),
              " fields (runtime.counters.new_counters()); got ", counters.sizes(), " ", counters.scalar_type());
  return counters.data_ptr<double>();
}

// One tested call of a site, added to its counters (kernels._count_relu's fields): `outputs`
// outputs of `big_k` MACs each, `pruned` of them pruned, `partial` MACs in heads, `test` MACs
// in tests, `remainder` MACs in the survivors' remainders, `computed` MACs spent in all.
void count_tested(const at::Tensor& counters, double outputs, double pruned, double big_k, double partial,
                  double test, double remainder, double computed, double negative) {
  double* cp = counter_slots(counters);
  cp[kCalls] += 1;
  cp[kOutputs] += outputs;
  cp[kPruned] += pruned;
  cp[kDense] += outputs * big_k;
  cp[kPartial] += partial;
  cp[kTest] += test;
  cp[kRemainder] += remainder;
  cp[kComputed] += computed;
  cp[kNegative] += negative;
}

struct Tally {
  double pruned = 0, used = 0, tests = 0, remainder = 0, negative = 0;
};

struct Offset {
  const float* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  float at(int64_t i, int64_t j) const { return p ? p[i * s0 + j * s1] : 0.0f; }
};

Offset offset_view(const at::Tensor& offset) {
  Offset o;
  if (offset.defined() && offset.numel()) {
    o.p = offset.data_ptr<float>();
    o.s0 = offset.stride(0);
    o.s1 = offset.stride(1);
  }
  return o;
}

// A site's critical value: one float32 for every output, or one per output.
struct Critical {
  const float* p;
  int64_t stride;
  Critical(const at::Tensor& critical, int64_t n_out)
      : p(critical.data_ptr<float>()), stride(critical.numel() == 1 ? 0 : 1) {
    TORCH_CHECK(critical.is_contiguous() && (critical.numel() == 1 || critical.numel() == n_out),
                "critical: one value or one per output");
  }
  float operator[](int64_t j) const { return p[j * stride]; }
};

// A site's head transposed (head_t [kh, ld]: row t is column t of every output's weight row,
// ld >= N a multiple of kLanes, zero past N; fast.py builds it once per weight).
struct HeadT {
  const float* p = nullptr;
  int64_t ld = 0;
};

HeadT head_view(const at::Tensor& head_t, int64_t kh, int64_t n_out) {
  HeadT h;
  TORCH_CHECK(head_t.defined() && head_t.dim() == 2 && head_t.is_contiguous() && head_t.scalar_type() == at::kFloat &&
                  head_t.size(0) == kh && head_t.size(1) >= n_out && head_t.size(1) % kLanes == 0,
              "head_t: contiguous float32 [k * unit, N rounded up to 16]");
  h.p = head_t.data_ptr<float>();
  h.ld = head_t.size(1);
  return h;
}

// The first `terms` terms' sum and sum of squares (unit elements a term) of the kLanes outputs
// from j0, on one input row: one vector multiply-add per head column, no per-output reduction.
inline void head_sums(const float* xr, const HeadT& ht, int64_t j0, int64_t terms, int64_t unit, float* s1,
                      float* s2) {
  Lanes a1 = {}, a2 = {};
  for (int64_t t = 0; t < terms; ++t) {
    Lanes v = {};
    for (int64_t u = t * unit; u < (t + 1) * unit; ++u) v += xr[u] * load(ht.p + u * ht.ld + j0);
    a1 += v;
    a2 += v * v;
  }
  std::memcpy(s1, &a1, sizeof(a1));
  std::memcpy(s2, &a2, sizeof(a2));
}

}  // namespace

// Early negative prediction for relu(a * (x @ w.T) + c), w = [head | rest] with head its first
// kh = k*unit columns. Returns z with pruned outputs 0. `ks` are the stage term counts
// (k, 2k, ...); test 0 = stats (mean < critical * se), 1 = threshold (mean < critical), with
// `critical` one float32 value or one per output. Work is split in blocks of outputs; a block's
// outputs are tested on every row, then each row's survivors get their remainders four at a time.
at::Tensor relu_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& head_t,
                       const at::Tensor& scale, const at::Tensor& offset, int64_t unit, std::vector<int64_t> ks,
                       int64_t test, const at::Tensor& critical, at::Tensor counters) {
  const int64_t m = x.size(0), big_k = x.size(1), n_out = weight.size(0), ldw = weight.stride(0);
  const int64_t n = big_k / unit, k = ks.front(), kh = k * unit, kr = big_k - kh;
  const HeadT ht = head_view(head_t, kh, n_out);
  auto out = at::empty({m, n_out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* hp = weight.data_ptr<float>();
  const float* rp = hp + kh;
  const float* ap = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Offset c = offset_view(offset);
  const bool stats = test == 0;
  const Critical crit(critical, n_out);
  const int64_t skip = (ks.back() - k) * unit;  // rest columns every survivor has consumed
  // per stage: 1/stage and the variance factor 1/(stage (stage-1)) (n-stage)/(n-1)
  std::vector<float> inv(ks.size()), fpc(ks.size());
  for (size_t q = 0; q < ks.size(); ++q) {
    inv[q] = 1.0f / ks[q];
    fpc[q] = static_cast<float>(n - ks[q]) / (static_cast<float>(n - 1) * ks[q] * (ks[q] - 1));
  }
  const float inv_n = 1.0f / n;
  const int64_t block = 16;
  const int64_t blocks = (n_out + block - 1) / block;
  std::vector<Tally> tallies(blocks);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, m * block * big_k));
  // A block's outputs are tested first (every row), then each row's surviving outputs get their
  // remainders four outputs at a time: four weight rows against one input row are four memory
  // streams (one weight row at a time, a remainder waits on memory: 25-30% slower at one row).
  // The block's weight rows stay in the core's cache while the rows of the call go through it.
  const int64_t lo = kh + skip, len = kr - skip;  // the remainder every survivor still needs
  static_assert(block == kLanes, "a block's head sums are one vector");
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> s1(m * block);  // the head sums of the block's outputs, [row][output]
    std::vector<float> h1(m * block), h2(m * block);  // the first stage's sums, [row][output]
    std::vector<std::vector<int64_t>> alive(m);  // per row, the block's surviving outputs
    for (int64_t b = b0; b < b1; ++b) {
      Tally t;
      const int64_t j0 = b * block, j1 = std::min(n_out, (b + 1) * block);
      for (auto& row : alive) row.clear();
      // the first stage's sums for the whole block, a lane per output, from the transposed head
      for (int64_t i = 0; i < m; ++i) head_sums(xp + i * big_k, ht, j0, k, unit, &h1[i * block], &h2[i * block]);
      for (int64_t j = j0; j < j1; ++j) {
        const float* rr = rp + j * ldw;
        const float a = ap[j];
        for (int64_t i = 0; i < m; ++i) {
          const float* xr = xp + i * big_k;
          const float cij = c.at(i, j);
          float a1 = 0, a2 = 0;
          int64_t done = 0;
          bool pruned = false;
          for (size_t q = 0; q < ks.size(); ++q) {
            if (q == 0) {
              a1 = h1[i * block + (j - j0)], a2 = h2[i * block + (j - j0)];
            } else {
              term_sums(xr + done * unit, rr + (done - k) * unit, ks[q] - done, unit, stats, a1, a2);
            }
            done = ks[q];
            t.tests += 1;
            const float mean = a * a1 * inv[q] + cij * inv_n;
            if (stats) {
              const float se = std::sqrt(a * a * std::max(a2 - a1 * a1 * inv[q], 0.0f) * fpc[q]);
              pruned = mean < crit[j] * se;
            } else {
              pruned = mean < crit[j];
            }
            if (pruned) break;
          }
          t.used += done;
          if (pruned) {
            t.pruned += 1;
            op[i * n_out + j] = 0.0f;
          } else {
            s1[i * block + (j - j0)] = a1;
            alive[i].push_back(j);
          }
        }
      }
      // the remainders of the survivors (all have consumed ks.back() terms)
      for (int64_t i = 0; i < m; ++i) {
        const std::vector<int64_t>& js = alive[i];
        const float* xr = xp + i * big_k + lo;
        const auto finish = [&](int64_t j, float rest) {
          const float z = ap[j] * (s1[i * block + (j - j0)] + rest) + c.at(i, j);
          op[i * n_out + j] = z;
          t.negative += z < 0;
        };
        size_t q = 0;
        float r4[4];
        for (; q + 4 <= js.size(); q += 4) {
          dot4(xr, rp + js[q] * ldw + skip, rp + js[q + 1] * ldw + skip, rp + js[q + 2] * ldw + skip,
               rp + js[q + 3] * ldw + skip, len, r4);
          for (int r = 0; r < 4; ++r) finish(js[q + r], r4[r]);
        }
        for (; q < js.size(); ++q) finish(js[q], dot(rp + js[q] * ldw + skip, xr, len));
        t.remainder += static_cast<double>(js.size()) * len;
      }
      tallies[b] = t;
    }
  });
  Tally total;
  for (const Tally& t : tallies) {
    total.pruned += t.pruned, total.used += t.used, total.tests += t.tests;
    total.remainder += t.remainder, total.negative += t.negative;
  }
  const double outputs = static_cast<double>(m) * n_out;
  const double test_macs = stats ? total.used + 4 * total.tests : 2 * total.tests;
  count_tested(counters, outputs, total.pruned, big_k, total.used * unit, test_macs, total.remainder,
               total.used * unit + total.remainder + test_macs, total.negative);
  return out;
}

// The longest head (in columns) that relu_linear_dense sums in its pass rather than by products.
constexpr int64_t kSmallHead = 32;

// The same site for many rows, where BLAS pays: the first k terms (and, for the stats test,
// their squares) and the remainder are three matrix products over all outputs (a short head:
// the remainder's product only, the head summed in the pass), then one fused pass tests,
// applies the epilogue, zeroes the pruned outputs and counts. Single stage. The stats test on
// terms of several columns (unit > 1) sums each term on its own, in one batched product.
at::Tensor relu_linear_dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& head_t,
                             const at::Tensor& scale, const at::Tensor& offset, int64_t unit, int64_t k, int64_t test,
                             const at::Tensor& critical, at::Tensor counters) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat,
              "relu_linear_dense: x [M, K] float32 with contiguous rows");
  const int64_t m = x.size(0), big_k = x.size(1), n_out = weight.size(0), kh = k * unit, n = big_k / unit;
  const bool stats = test == 0;
  const at::Tensor head = weight.narrow(1, 0, kh), rest = weight.narrow(1, kh, big_k - kh);
  const at::Tensor xh = x.narrow(1, 0, kh);
  // A short head (kSmallHead columns or fewer) is summed in the pass below, from its transposed
  // copy: two more products on so few columns cost more than the whole pass.
  const bool inline_head = kh <= kSmallHead && unit == 1;
  const HeadT given = head_view(head_t, kh, n_out);
  const int64_t ldh = given.ld;
  at::Tensor s1, s2;
  if (stats && unit > 1 && !inline_head) {
    // each term's sum on its own (unit columns): one batched product [k, M, N], then the sums
    const at::Tensor parts =
        at::bmm(xh.reshape({m, k, unit}).transpose(0, 1), head.reshape({n_out, k, unit}).permute({1, 2, 0}));
    s1 = parts.sum(0);
    s2 = parts.square().sum(0);
  } else if (!inline_head) {
    s1 = at::mm(xh, head.t());
    if (stats) s2 = at::mm(xh.square(), head.square().t());
  }
  at::Tensor out = at::mm(x.narrow(1, kh, big_k - kh), rest.t());  // the remainder, then z in place
  const float* p1 = inline_head ? nullptr : s1.data_ptr<float>();
  const float* p2 = s2.defined() ? s2.data_ptr<float>() : nullptr;
  const float* hp = inline_head ? given.p : nullptr;
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float* ap = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Offset c = offset_view(offset);
  const Critical crit(critical, n_out);
  std::vector<float> crits(n_out);  // one per output, so that the pass below is one plain loop
  for (int64_t j = 0; j < n_out; ++j) crits[j] = crit[j];
  const float* cp = crits.data();
  const float inv = 1.0f / k, inv_n = 1.0f / n;
  const float fpc = static_cast<float>(n - k) / (static_cast<float>(n - 1) * k * (k - 1));
  std::vector<Tally> tallies(m);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_out)), [&](int64_t i0, int64_t i1) {
    std::vector<float> row_c(n_out), sums1(inline_head ? n_out : 0), sums2(inline_head ? n_out : 0);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < n_out; ++j) row_c[j] = c.at(i, j);
      const float* cr = row_c.data();
      const float* r1 = inline_head ? sums1.data() : p1 + i * n_out;
      const float* r2 = inline_head ? sums2.data() : stats ? p2 + i * n_out : r1;  // (threshold test: not read)
      if (inline_head) {  // the head's sums for every output of row i; zero inputs add nothing
        std::fill(sums1.begin(), sums1.end(), 0.0f);
        std::fill(sums2.begin(), sums2.end(), 0.0f);
        for (int64_t t = 0; t < kh; ++t) {
          const float xv = xp[i * ldx + t];
          if (xv == 0.0f) continue;
          const float* ht = hp + t * ldh;
          if (stats) {
            for (int64_t j = 0; j < n_out; ++j) {
              const float v = xv * ht[j];
              sums1[j] += v;
              sums2[j] += v * v;
            }
          } else {  // the threshold test reads no squares
            for (int64_t j = 0; j < n_out; ++j) sums1[j] += xv * ht[j];
          }
        }
      }
      float* orow = op + i * n_out;
      int32_t cut = 0, neg = 0;
      // a select, no branch: whether an output is pruned follows no predictable order
      // (the square roots vectorize: the build sets -fno-math-errno)
      for (int64_t j = 0; j < n_out; ++j) {
        const float a = ap[j], a1 = r1[j];
        const float mean = a * a1 * inv + cr[j] * inv_n;
        const float var = r2[j] - a1 * a1 * inv;
        const float bound = stats ? cp[j] * std::sqrt(a * a * (var > 0.0f ? var : 0.0f) * fpc) : cp[j];
        const int32_t pruned = mean < bound;
        const float z = a * (a1 + orow[j]) + cr[j];
        orow[j] = pruned ? 0.0f : z;
        cut += pruned;
        neg += (pruned == 0) & (z < 0.0f);
      }
      tallies[i].pruned = cut;
      tallies[i].negative = neg;
    }
  });
  double pruned = 0, negative = 0;
  for (const Tally& t : tallies) pruned += t.pruned, negative += t.negative;
  const double outputs = static_cast<double>(m) * n_out;
  const double test_macs = stats ? outputs * (k + 4) : 2 * outputs;
  count_tested(counters, outputs, pruned, big_k, outputs * kh, test_macs, (outputs - pruned) * (big_k - kh),
               outputs * big_k + test_macs, negative);
  return out;
}

// The epilogue of a site run dense (the "fastest" setting), in place and in one pass:
// z = a * z + c on z viewed as [M, N, S] (contiguous; S = 1 for a linear layer, the spatial
// size for a convolution), a [N], c empty or [M, N, S] with any strides (0 for broadcast).
// The counters record one call that prunes nothing (every output computes its `terms` MACs)
// and, when `count_negative`, the outputs left negative (what a perfect predictor would prune).
// `per_row`: the site decides once per row (argmax), so it counts M outputs.
void dense_epilogue(at::Tensor z, const at::Tensor& scale, const at::Tensor& offset, at::Tensor counters,
                    int64_t terms, bool count_negative, bool per_row) {
  TORCH_CHECK(z.is_contiguous() && z.scalar_type() == at::kFloat && z.dim() == 3, "dense_epilogue: z [M, N, S] float32");
  const int64_t m = z.size(0), n = z.size(1), sp = z.size(2);
  const float* ap = scale.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const bool has_c = offset.defined() && offset.numel();
  const float* cp = has_c ? offset.data_ptr<float>() : nullptr;
  const int64_t c0 = has_c ? offset.stride(0) : 0, c1 = has_c ? offset.stride(1) : 0, c2 = has_c ? offset.stride(2) : 0;
  const int64_t planes = m * n;
  std::atomic<int64_t> negative{0};
  // one (row, feature) plane of S elements per step; S = 1: a row of N features per step
  const bool rows = sp == 1;
  const int64_t steps = rows ? m : planes, width = rows ? n : sp;
  at::parallel_for(0, steps, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, width)), [&](int64_t b0, int64_t b1) {
    int64_t neg = 0;
    for (int64_t b = b0; b < b1; ++b) {
      float* zr = zp + b * width;
      if (rows) {
        const float* cr = cp ? cp + b * c0 : nullptr;
        if (cr && c1 == 1) {
          for (int64_t j = 0; j < n; ++j) { const float v = ap[j] * zr[j] + cr[j]; zr[j] = v; neg += v < 0; }
        } else {
          for (int64_t j = 0; j < n; ++j) { const float v = ap[j] * zr[j] + (cr ? cr[j * c1] : 0.0f); zr[j] = v; neg += v < 0; }
        }
      } else {
        const int64_t i = b / n, j = b % n;
        const float a = ap[j];
        const float* cr = cp ? cp + i * c0 + j * c1 : nullptr;
        if (!cr) {
          for (int64_t s = 0; s < sp; ++s) { const float v = a * zr[s]; zr[s] = v; neg += v < 0; }
        } else if (c2 == 0) {
          const float c = cr[0];
          for (int64_t s = 0; s < sp; ++s) { const float v = a * zr[s] + c; zr[s] = v; neg += v < 0; }
        } else if (c2 == 1) {
          for (int64_t s = 0; s < sp; ++s) { const float v = a * zr[s] + cr[s]; zr[s] = v; neg += v < 0; }
        } else {
          for (int64_t s = 0; s < sp; ++s) { const float v = a * zr[s] + cr[s * c2]; zr[s] = v; neg += v < 0; }
        }
      }
    }
    negative += neg;
  });
  const int64_t neg = negative.load();
  const double outputs = static_cast<double>(m) * n * sp, dense = outputs * terms;
  double* kp = counter_slots(counters);
  kp[kCalls] += 1;
  kp[kOutputs] += per_row ? static_cast<double>(m) : outputs;
  kp[kUntested] += per_row ? static_cast<double>(m) : outputs;
  kp[kDense] += dense;
  kp[kRemainder] += dense;
  kp[kComputed] += dense;
  if (count_negative) kp[kNegative] += static_cast<double>(neg);
}

// A site run dense in place: z [..., N] (linear) or [B, C, H, W] (convolution), scale one value
// per output feature or channel, offset None or broadcastable to z (any dtype).
void dense_site(at::Tensor z, const at::Tensor& scale, const c10::optional<at::Tensor>& offset, at::Tensor counters,
                int64_t terms, bool count_negative, bool per_row) {
  TORCH_CHECK(z.is_contiguous() && z.scalar_type() == at::kFloat, "dense_site: z must be contiguous float32");
  const bool conv = z.dim() == 4;
  const int64_t n = conv ? z.size(1) : (z.dim() ? z.size(-1) : 1);
  at::Tensor planes = conv ? z.view({z.size(0), n, z.size(2) * z.size(3)})
                           : z.view({z.numel() / std::max<int64_t>(n, 1), n, 1});
  at::Tensor c = offset.has_value() ? offset->to(at::kFloat).expand_as(z).reshape(planes.sizes()) : at::Tensor();
  dense_epilogue(planes, scale.to(at::kFloat).contiguous(), c, counters, terms, count_negative, per_row);
}

// The same linear site run dense, for a call where no early-exit kernel beats the dense layer
// (the "fastest" setting): one matrix product and the epilogue pass; nothing is pruned, and the
// counters say so (every output computes all its terms).
at::Tensor linear_dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const at::Tensor& offset, at::Tensor counters) {
  const int64_t m = x.size(0), big_k = x.size(1), n_out = weight.size(0);
  at::Tensor out = at::mm(x, weight.t());
  const at::Tensor c = offset.defined() && offset.numel() ? offset.unsqueeze(2) : at::Tensor();
  dense_epilogue(out.view({m, n_out, 1}), scale, c, counters, big_k, true, false);
  return out;
}

namespace {

enum Setting { kAuto = 0, kFast = 1, kFastest = 2 };
enum Kernel { kRowWise = 0, kBlas = 1, kDenseLayer = 2 };

// The term counts tested in turn, as kernels.stage_ks: k, 2k, 4k, ... (`stages` of them, each below n).
std::vector<int64_t> stage_ks(int64_t k, int64_t n, int64_t stages) {
  std::vector<int64_t> ks{k};
  while (static_cast<int64_t>(ks.size()) < stages && 2 * ks.back() < n) ks.push_back(2 * ks.back());
  return ks;
}

}  // namespace

// The cost model of fast.choose (documented there): the kernel for one call of a linear site,
// from its rows, the head's share of the terms, the measured share of outputs kept so far
// (counters) and the contraction length.
int64_t choose(int64_t rows, double k_share, const at::Tensor& counters, int64_t terms, int64_t setting,
               double row_budget, double dense_budget, double output_cost, int64_t min_terms) {
  if (setting == kFast) return kRowWise;
  const double* cp = counter_slots(counters);
  const double tested = cp[kOutputs] - cp[kUntested];  // calls run dense prune nothing: not evidence
  const double survivors = tested > 0 ? 1.0 - cp[kPruned] / tested : 1.0;
  const double reads = rows * (k_share + (1.0 - k_share) * survivors);
  if (setting == kFastest) {
    return terms >= min_terms && reads + rows * output_cost / terms <= dense_budget ? kRowWise : kDenseLayer;
  }
  return reads <= row_budget ? kRowWise : kBlas;
}

// One call of a linear site (kernels.relu_linear's arguments: x [..., K], offset None or
// broadcastable to [..., N]) on the fast kernels, everything a call needs in one C++ call:
// the checks, the flattening, the cost model (`kernel` < 0) or a forced kernel, the kernel.
// `head_t`: the weight's head transposed (HeadT; None only where the call is not covered). None where no fast kernel covers the call (not float32 CPU, columns not contiguous, the BLAS
// kernel asked for several stages): the caller runs the reference kernel.
c10::optional<at::Tensor> linear_site(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& head_t, const at::Tensor& scale,
                                      const c10::optional<at::Tensor>& offset, int64_t unit, int64_t k, int64_t test,
                                      const at::Tensor& critical, at::Tensor counters, int64_t stages, int64_t setting,
                                      int64_t kernel, double row_budget, double dense_budget, double output_cost,
                                      int64_t min_terms) {
  const bool covered = x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == at::kFloat &&
                       weight.scalar_type() == at::kFloat && x.dim() >= 1 && weight.dim() == 2 &&
                       weight.stride(1) == 1 && counters.device().is_cpu() &&
                       counters.scalar_type() == at::kDouble && counters.is_contiguous();
  if (!covered) return c10::nullopt;
  const int64_t big_k = x.size(-1), n_out = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, big_k}).contiguous();
  const int64_t m = x2.size(0);
  const std::vector<int64_t> ks = stage_ks(k, big_k / unit, stages);
  if (kernel < 0) {
    kernel = choose(m, static_cast<double>(k * unit) / big_k, counters, big_k, setting, row_budget, dense_budget,
                    output_cost, min_terms);
  }
  if (kernel == kBlas && ks.size() > 1) return c10::nullopt;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n_out);
  const at::Tensor c = offset.has_value() ? offset->to(at::kFloat).expand(shape).reshape({m, n_out}) : at::Tensor();
  const at::Tensor a = scale.to(at::kFloat).contiguous();
  at::Tensor out;
  if (kernel == kDenseLayer) {
    out = linear_dense(x2, weight, a, c, counters);
  } else {
    const at::Tensor crit = critical.to(at::kFloat).reshape({-1}).contiguous();
    TORCH_CHECK(head_t.has_value(), "linear_site: the head transposed (fast.py builds it once per weight)");
    const at::Tensor& ht = *head_t;
    out = kernel == kRowWise ? relu_linear(x2, weight, ht, a, c, unit, ks, test, crit, counters)
                             : relu_linear_dense(x2, weight, ht, a, c, unit, k, test, crit, counters);
  }
  return out.view(shape);
}
