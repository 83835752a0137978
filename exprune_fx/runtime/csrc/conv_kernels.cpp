// Fast CPU kernels for convolution ExPrune sites (float32): the second part of the extension
// that exprune_fx/runtime/fast.py builds (after fast_kernels.cpp, whose helpers it uses; the
// parts are compiled as one translation unit, bindings.cpp last).
//
// They keep the reference's work split (head for every output, remainder for whole channels
// with a survivor: that part is torch's convolution) and fuse what the reference runs as many
// small ops: the head's sums and squares per term (one small convolution per term there), the
// test, the epilogue and the counters.
namespace {

// (Lanes, load: fast_kernels.cpp.) A lane-wise comparison's result: -1 where true, 0 where false.
typedef int32_t Cut __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Square roots of non-negative lanes (one instruction where the CPU has AVX-512; a plain
// sqrtf loop is not vectorized, as sqrtf may set errno).
inline Lanes sqrt_lanes(Lanes v) {
#if defined(__AVX512F__)
  return reinterpret_cast<Lanes>(_mm512_sqrt_ps(reinterpret_cast<__m512>(v)));
#else
  for (int64_t l = 0; l < kLanes; ++l) v[l] = std::sqrt(v[l]);
  return v;
#endif
}

// One bit per lane, set where the lane is nonzero.
inline uint32_t nonzero_lanes(Cut v) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask(reinterpret_cast<__m512i>(v), reinterpret_cast<__m512i>(v));
#else
  uint32_t bits = 0;
  for (int64_t l = 0; l < kLanes; ++l) bits |= static_cast<uint32_t>(v[l] != 0) << l;
  return bits;
#endif
}

// Stores four vectors r0..r3 (four output positions, a lane per channel) channels first: lane l
// of each, in that order, at dst + l * stride (a 4 x 16 transpose, in registers on AVX-512).
inline void store_transposed(Lanes r0, Lanes r1, Lanes r2, Lanes r3, float* dst, int64_t stride) {
#if defined(__AVX512F__)
  const __m512 t0 = _mm512_unpacklo_ps(reinterpret_cast<__m512>(r0), reinterpret_cast<__m512>(r1));
  const __m512 t1 = _mm512_unpackhi_ps(reinterpret_cast<__m512>(r0), reinterpret_cast<__m512>(r1));
  const __m512 t2 = _mm512_unpacklo_ps(reinterpret_cast<__m512>(r2), reinterpret_cast<__m512>(r3));
  const __m512 t3 = _mm512_unpackhi_ps(reinterpret_cast<__m512>(r2), reinterpret_cast<__m512>(r3));
  // u[i]'s 128-bit block j holds lane 4j + i of r0..r3
  const __m512 u[4] = {
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2))),
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)))};
  for (int i = 0; i < 4; ++i) {
    _mm_storeu_ps(dst + i * stride, _mm512_extractf32x4_ps(u[i], 0));
    _mm_storeu_ps(dst + (4 + i) * stride, _mm512_extractf32x4_ps(u[i], 1));
    _mm_storeu_ps(dst + (8 + i) * stride, _mm512_extractf32x4_ps(u[i], 2));
    _mm_storeu_ps(dst + (12 + i) * stride, _mm512_extractf32x4_ps(u[i], 3));
  }
#else
  for (int64_t l = 0; l < kLanes; ++l) {
    float* d = dst + l * stride;
    d[0] = r0[l], d[1] = r1[l], d[2] = r2[l], d[3] = r3[l];
  }
#endif
}

// A convolution site's single-stage test on its first k of n terms (kernels._decide_negative):
// per output channel its scale a and critical value, both padded per group as the transposed
// weight is (`padded` channels a group), and the offset: one value per channel (`chan_c`, padded
// likewise) or c [B, C, oh, ow] with any strides (both null: none). Plain values, so that a
// task copies it whole (see Job below).
struct ConvTest {
  const float *a, *crit, *chan_c, *c;
  int64_t cs[4];
  bool stats;
  float inv_k, inv_n, fpc;
};

}  // namespace

// The first terms' sum and sum of squares for every output of a convolution site, in one pass
// (kernels._conv_term_sums; the reference runs one small convolution per term for the squares).
// x [B, G * kc, Hp, Wp]: the site's first kc = terms * unit input channels of each group,
// already zero-padded (so every window is inside); weight [G, terms * width, Cp]: the site's
// weight for those channels, transposed so that its output channels are contiguous and
// zero-padded to Cp, a multiple of 2 * kLanes (`width` = unit * kh * kw values per term, in
// (channel, dy, dx) order, as conv weights are laid out); `chans` the true output channels per
// group. Returns s1, s2 [B, G * chans, oh, ow] (s2 empty unless `squares`).
// With a `decision` (a site's single-stage test: ReLU sites, kernels._decide_negative), s2 is
// not written: the third result is the pruned mask (uint8, the same layout) and the fourth one
// flag per output channel, set where any output of the channel survives.
// A task computes 4 output positions x 32 output channels: each weight vector load feeds four
// multiply-adds, each input value two.
std::vector<at::Tensor> conv_term_sums(const at::Tensor& x, const at::Tensor& weight, int64_t chans, int64_t terms,
                                       int64_t unit, int64_t kh, int64_t kw, int64_t oh, int64_t ow,
                                       std::vector<int64_t> stride, std::vector<int64_t> dilation, bool squares,
                                       const ConvTest* decision) {
  constexpr int P = 4, O = 2;
  const int64_t width = unit * kh * kw, span = terms * width;
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat && x.dim() == 4 && weight.dim() == 3 && stride.size() == 2 &&
                  dilation.size() == 2,
              "conv_term_sums: contiguous float32 x [B, G*kc, Hp, Wp] and weight [G, terms*width, Cp]");
  const int64_t batch = x.size(0), groups = weight.size(0), padded = weight.size(2), hp = x.size(2), wp = x.size(3);
  TORCH_CHECK(weight.size(1) == span && x.size(1) == groups * terms * unit && padded % (O * kLanes) == 0 &&
                  chans <= padded && (oh - 1) * stride[0] + (kh - 1) * dilation[0] < hp &&
                  (ow - 1) * stride[1] + (kw - 1) * dilation[1] < wp,
              "conv_term_sums: shapes do not match");
  const int64_t len = oh * ow, wide = groups * chans;
  const bool decide = decision != nullptr;
  at::Tensor s1 = at::empty({batch, wide, oh, ow}, x.options());
  at::Tensor s2 = squares && !decide ? at::empty_like(s1) : at::Tensor();
  at::Tensor pruned = decide ? at::empty({batch, wide, oh, ow}, x.options().dtype(at::kByte)) : at::Tensor();
  at::Tensor alive = decide ? at::zeros({wide}, x.options().dtype(at::kByte)) : at::Tensor();
  uint8_t* mp = decide ? pruned.data_ptr<uint8_t>() : nullptr;
  uint8_t* lp = decide ? alive.data_ptr<uint8_t>() : nullptr;
  std::vector<int64_t> offset(span);  // of each (channel, dy, dx) from its window's corner
  for (int64_t j = 0; j < span; ++j) {
    offset[j] = j / (kh * kw) * hp * wp + j / kw % kh * dilation[0] * wp + j % kw * dilation[1];
  }
  // Everything a task reads, copied into one local struct per thread below: the mask's byte
  // stores may alias any memory, so values read through the lambda's captures would be
  // reloaded after each of them.
  struct Job {
    const int64_t* off;
    const float *x, *w;
    float *s1, *s2;
    uint8_t *mask, *alive;  // null: no test
    ConvTest test;
    int64_t terms, unit, hp, wp, ow, len, wide, chans, padded, span, width, groups, blocks, spots, sy, sx;
  };
  const Job job{offset.data(), x.data_ptr<float>(), weight.data_ptr<float>(), s1.data_ptr<float>(),
                s2.defined() ? s2.data_ptr<float>() : nullptr, mp, lp, decide ? *decision : ConvTest{},
                terms, unit, hp, wp, ow, len, wide, chans, padded, span, width, groups,
                padded / (O * kLanes), (len + P - 1) / P, stride[0], stride[1]};
  const int64_t tasks = batch * groups * job.blocks * job.spots;
  at::parallel_for(0, tasks, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, span)), [&job](int64_t t0, int64_t t1) {
    const Job J = job;
    // bit l of entry (g, block, o): this thread has flagged that vector's lane l alive
    std::vector<uint32_t> flagged(J.mask ? J.groups * J.blocks * O : 0, 0);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t spot = task % J.spots, block = task / J.spots % J.blocks;
      const int64_t g = task / (J.spots * J.blocks) % J.groups, b = task / (J.spots * J.blocks * J.groups);
      const float* xg = J.x + (b * J.groups + g) * J.terms * J.unit * J.hp * J.wp;
      const float* wg = J.w + g * J.span * J.padded + block * O * kLanes;
      int64_t corner[P];
      const int64_t p0 = spot * P, np = std::min<int64_t>(P, J.len - p0);
      for (int q = 0; q < P; ++q) {
        const int64_t pos = p0 + std::min<int64_t>(q, np - 1);  // past the end: repeat the last, not stored
        corner[q] = pos / J.ow * J.sy * J.wp + pos % J.ow * J.sx;
      }
      // registers only: no address of a1, a2, t or w is taken (that keeps them out of memory)
      Lanes a1[P][O] = {}, a2[P][O] = {};
      for (int64_t i = 0; i < J.terms; ++i) {
        Lanes t[P][O] = {};
        for (int64_t j = i * J.width; j < (i + 1) * J.width; ++j) {
          Lanes w[O];
          for (int o = 0; o < O; ++o) {
            w[o] = load(wg + j * J.padded + o * kLanes);
#if defined(__x86_64__)
            asm("" : "+v"(w[o]));  // one load per weight vector, not one per multiply-add
#endif
          }
          const float* xj = xg + J.off[j];
          for (int q = 0; q < P; ++q) {
            const float v = xj[corner[q]];
            for (int o = 0; o < O; ++o) t[q][o] += v * w[o];
          }
        }
        for (int q = 0; q < P; ++q) {
          for (int o = 0; o < O; ++o) a1[q][o] += t[q][o], a2[q][o] += t[q][o] * t[q][o];
        }
      }
      // Channels first: each channel's np positions are consecutive (scattered over kLanes
      // rows; a task's multiply-adds far outnumber these stores).
      for (int o = 0; o < O; ++o) {
        const int64_t c0 = (block * O + o) * kLanes, n = std::min<int64_t>(kLanes, J.chans - c0);
        if (n <= 0) continue;
        const int64_t at_out = (b * J.wide + g * J.chans + c0) * J.len + p0;  // lane l: + l * len
        Cut cut[P] = {};  // -1 where pruned
        if (J.mask) {
          const ConvTest& d = J.test;
          const Lanes a = load(d.a + g * J.padded + c0), crit = load(d.crit + g * J.padded + c0);
          const Lanes chan_c = d.chan_c ? load(d.chan_c + g * J.padded + c0) : Lanes{};
          for (int q = 0; q < np; ++q) {
            const Lanes s = a1[q][o];
            Lanes c = chan_c;
            if (d.c) {
              const int64_t pos = p0 + q, at_c = b * d.cs[0] + pos / J.ow * d.cs[2] + pos % J.ow * d.cs[3];
              for (int64_t l = 0; l < n; ++l) c[l] = d.c[at_c + (g * J.chans + c0 + l) * d.cs[1]];
            }
            const Lanes mean = a * s * d.inv_k + c * d.inv_n;
            Lanes bound = crit;
            if (d.stats) {
              Lanes var = a2[q][o] - s * s * d.inv_k;
              var = a * a * (var > 0.0f ? var : 0.0f) * d.fpc;
              bound *= sqrt_lanes(var);
            }
            cut[q] = mean < bound;
          }
        }
        if (np == P && n == kLanes) {  // a whole task: vector stores
          static_assert(P == 4, "store_transposed writes four positions");
          store_transposed(a1[0][o], a1[1][o], a1[2][o], a1[3][o], J.s1 + at_out, J.len);
          if (J.s2) store_transposed(a2[0][o], a2[1][o], a2[2][o], a2[3][o], J.s2 + at_out, J.len);
          if (!J.mask) continue;
          // each channel's four mask bytes as one 32-bit word (little-endian: position q in byte q)
          const Cut word = (cut[0] & 1) | (cut[1] & 1) << 8 | (cut[2] & 1) << 16 | (cut[3] & 1) << 24;
          for (int64_t l = 0; l < kLanes; ++l) {
            const int32_t bytes = word[l];
            std::memcpy(J.mask + at_out + l * J.len, &bytes, sizeof(bytes));
          }
          // the channels with a survivor that this thread has not flagged yet (after a few
          // tasks, none: the shared flags are left alone)
          uint32_t& seen = flagged[(g * J.blocks + block) * O + o];
          const uint32_t fresh = nonzero_lanes(~(cut[0] & cut[1] & cut[2] & cut[3])) & ~seen;
          seen |= fresh;
          for (int64_t l = 0; fresh >> l; ++l) {
            uint8_t* flag = J.alive + g * J.chans + c0 + l;
            if (fresh >> l & 1 && !__atomic_load_n(flag, __ATOMIC_RELAXED)) __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
          }
          continue;
        }
        // lane by lane through buffers (the 4 x 16 transpose): a task's last positions, or a
        // group's last channels
        float v1[P][kLanes], v2[P][kLanes];
        int32_t vm[P][kLanes];
        for (int q = 0; q < P; ++q) {
          std::memcpy(v1[q], &a1[q][o], sizeof(v1[q]));
          std::memcpy(v2[q], &a2[q][o], sizeof(v2[q]));
          std::memcpy(vm[q], &cut[q], sizeof(vm[q]));
        }
        const bool whole = np == P;
        for (int64_t l = 0; l < n; ++l) {
          float* s1r = J.s1 + at_out + l * J.len;
          int32_t alive = 0;
          if (whole) {
            for (int q = 0; q < P; ++q) s1r[q] = v1[q][l];
          } else {
            for (int q = 0; q < np; ++q) s1r[q] = v1[q][l];
          }
          if (J.s2) {
            for (int q = 0; q < np; ++q) J.s2[at_out + l * J.len + q] = v2[q][l];
          }
          if (!J.mask) continue;
          uint8_t* mr = J.mask + at_out + l * J.len;
          if (whole) {
            for (int q = 0; q < P; ++q) mr[q] = vm[q][l] & 1, alive |= ~vm[q][l] & 1;
          } else {
            for (int q = 0; q < np; ++q) mr[q] = vm[q][l] & 1, alive |= ~vm[q][l] & 1;
          }
          if (!alive) continue;
          uint8_t* flag = J.alive + g * J.chans + c0 + l;
          if (!__atomic_load_n(flag, __ATOMIC_RELAXED)) __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
        }
      }
    }
  });
  if (decide) return {s1, at::Tensor(), pruned, alive};
  return {s1, s2};
}

namespace {

// An optional offset [B, C, oh, ow] with any strides (0 for broadcast): its data and strides.
const float* offset_4d(const c10::optional<at::Tensor>& c, int64_t* strides) {
  if (!c.has_value() || !c->defined()) return nullptr;
  TORCH_CHECK(c->dim() == 4 && c->scalar_type() == at::kFloat, "conv site: offset [B, C, oh, ow] float32");
  for (int d = 0; d < 4; ++d) strides[d] = c->stride(d);
  return c->data_ptr<float>();
}

}  // namespace

// A convolution site's head with its single-stage test (conv_term_sums with a decision):
// returns s1 [B, G*C, oh, ow], the pruned mask (uint8, the same layout) and one flag per output
// channel, set where any of its outputs survives. `a` [G*C], `critical` one value or [G*C],
// `offset` None or [B, G*C, oh, ow] with any strides, `n` the site's terms.
std::vector<at::Tensor> conv_head(const at::Tensor& x, const at::Tensor& weight, int64_t chans, int64_t terms,
                                  int64_t unit, int64_t kh, int64_t kw, int64_t oh, int64_t ow,
                                  std::vector<int64_t> stride, std::vector<int64_t> dilation, int64_t test,
                                  const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                                  const at::Tensor& critical, int64_t n) {
  const int64_t wide = weight.size(0) * chans;
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == wide,
              "conv_head: scale, one float32 per output channel");
  TORCH_CHECK(terms >= 2 && terms < n, "conv_head: 2 <= k < n terms");
  const int64_t groups = weight.size(0), padded = weight.size(2);
  const Critical crit(critical, wide);
  int64_t cs[4] = {0, 0, 0, 0};
  const float* cp = offset_4d(offset, cs);
  const bool per_channel = cp && cs[0] == 0 && cs[2] == 0 && cs[3] == 0;  // (a bias: the common case)
  // padded as the weight
  std::vector<float> a(groups * padded, 0.0f), crits(groups * padded, 0.0f), chan_c(per_channel ? groups * padded : 0);
  const float* ap = scale.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t ch = 0; ch < chans && ch < padded; ++ch) {
      a[g * padded + ch] = ap[g * chans + ch];
      crits[g * padded + ch] = crit[g * chans + ch];
      if (per_channel) chan_c[g * padded + ch] = cp[(g * chans + ch) * cs[1]];
    }
  }
  ConvTest d{a.data(), crits.data(), per_channel ? chan_c.data() : nullptr, per_channel ? nullptr : cp,
             {cs[0], cs[1], cs[2], cs[3]}, test == 0, 1.0f / terms, 1.0f / n,
             static_cast<float>(n - terms) / (static_cast<float>(n - 1) * terms * (terms - 1))};
  return conv_term_sums(x, weight, chans, terms, unit, kh, kw, oh, ow, stride, dilation, d.stats, &d);
}

// A convolution site's output from its head (conv_head) and remainder z [B, Cz, oh, ow]
// (contiguous; None: no remainder computed), in one pass: a * (s1 + z) + c, 0 where pruned;
// `slot` None (z has every channel) or z's channel per output channel (-1: not computed, all
// its outputs are pruned). Counts the call as kernels._count_relu does for one stage
// (`term_macs` MACs a term, `big_k` an output's MACs, `computed` the MACs of the head and
// remainder convolutions; `test` 0 = stats). Returns [B, C, oh, ow]: z itself, overwritten, when
// it has every channel.
at::Tensor conv_finish(const c10::optional<at::Tensor>& z, const at::Tensor& s1, const at::Tensor& pruned,
                       const c10::optional<at::Tensor>& slot, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& offset, at::Tensor counters, int64_t oh, int64_t ow,
                       int64_t terms, int64_t term_macs, int64_t big_k, int64_t test, double computed) {
  const int64_t batch = s1.size(0), wide = s1.size(1), len = s1.size(2) * s1.size(3);
  TORCH_CHECK(s1.is_contiguous() && pruned.is_contiguous() && s1.dim() == 4 && len == oh * ow &&
                  pruned.sizes() == s1.sizes(),
              "conv_finish: s1 and pruned [B, C, oh, ow]");
  const bool has_z = z.has_value() && z->defined();
  TORCH_CHECK(!has_z || (z->is_contiguous() && z->scalar_type() == at::kFloat && z->size(0) == batch &&
                         z->size(2) * z->size(3) == len),
              "conv_finish: z [B, Cz, oh, ow] contiguous float32");
  const int64_t cz = has_z ? z->size(1) : 0;
  const int64_t* sp = slot.has_value() && slot->defined() ? slot->data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(sp || !has_z || cz == wide, "conv_finish: z must have every channel without a slot map");
  int64_t cs[4] = {0, 0, 0, 0};
  const float* cp = offset_4d(offset, cs);
  // z with every channel is this call's own temporary: the output overwrites it (one fresh
  // buffer less, and fresh buffers cost page faults)
  at::Tensor out = has_z && !sp ? *z : at::empty({batch, wide, oh, ow}, s1.options());
  const float* s1p = s1.data_ptr<float>();
  const uint8_t* mp = pruned.data_ptr<uint8_t>();
  const float* zp = has_z ? z->data_ptr<float>() : nullptr;
  const float* ap = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<int64_t> n_pruned{0}, negative{0};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, len));
  at::parallel_for(0, batch * wide, grain, [&](int64_t t0, int64_t t1) {
    int64_t cut = 0, neg = 0;
    std::vector<float> zeros, offsets(len);
    for (int64_t plane = t0; plane < t1; ++plane) {
      const int64_t b = plane / wide, ch = plane % wide;
      const int64_t zc = sp ? sp[ch] : ch;
      const float* zr = zp && zc >= 0 ? zp + (b * cz + zc) * len : nullptr;
      if (!zr) zeros.resize(len, 0.0f), zr = zeros.data();
      // the offset at each position (a value per plane, per channel or none, is repeated)
      if (cp && (cs[2] || cs[3])) {
        for (int64_t y = 0, p = 0; y < oh; ++y) {
          for (int64_t xx = 0; xx < ow; ++xx, ++p) offsets[p] = cp[b * cs[0] + ch * cs[1] + y * cs[2] + xx * cs[3]];
        }
      } else {
        std::fill(offsets.begin(), offsets.end(), cp ? cp[b * cs[0] + ch * cs[1]] : 0.0f);
      }
      const float a = ap[ch];
      const float* sr = s1p + plane * len;
      const float* cr = offsets.data();
      const uint8_t* mr = mp + plane * len;
      float* orow = op + plane * len;
      int32_t cut_here = 0, neg_here = 0;
      for (int64_t p = 0; p < len; ++p) {  // a select, no branch: the mask has no predictable order
        const int32_t m = mr[p];
        const float v = a * (sr[p] + zr[p]) + cr[p];
        orow[p] = m ? 0.0f : v;
        cut_here += m;
        neg_here += (m == 0) & (v < 0.0f);
      }
      cut += cut_here;
      neg += neg_here;
    }
    n_pruned += cut;
    negative += neg;
  });
  const double outputs = static_cast<double>(batch) * wide * len, cut = static_cast<double>(n_pruned.load());
  const double used = outputs * terms, test_macs = test == 0 ? used + 4 * outputs : 2 * outputs;
  const double remainder = (outputs - cut) * (big_k - terms * term_macs);
  count_tested(counters, outputs, cut, big_k, used * term_macs, test_macs, remainder, computed + test_macs,
               static_cast<double>(negative.load()));
  return out;
}
