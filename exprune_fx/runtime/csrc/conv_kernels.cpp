// Fast CPU kernels for convolution ExPrune sites (float32): the second part of the extension
// that exprune_fx/runtime/fast.py builds (after fast_kernels.cpp, whose helpers it uses; the
// parts are compiled as one translation unit, bindings.cpp last).
//
// They keep the reference's work split (head for every output, remainder for whole channels
// with a survivor: that part is torch's convolution) and fuse what the reference runs as many
// small ops: the head's sums and squares per term (one small convolution per term there), the
// test, the epilogue and the counters.
namespace {

// 16 float lanes (GCC/Clang vector extension: one AVX-512 register, two AVX2 ones, ...).
constexpr int64_t kLanes = 16;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

// A convolution site's single-stage test on its first k of n terms (kernels._decide_negative):
// scale a and critical value (one, or one per channel: crit_stride 0 or 1) per output channel,
// the offset c [B, C, oh, ow] with any strides (null: none).
struct ConvTest {
  const float* a;
  const float* c;
  int64_t cs[4];
  const float* crit;
  int64_t crit_stride;
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
// group. Returns s1, s2 [B, oh * ow, G * chans] (s2 empty unless `squares`): channels last.
// With a `decision` (a site's single-stage test: ReLU sites, kernels._decide_negative), s2 is
// not written: the third result is the pruned mask (uint8, the same layout) and the fourth one
// flag per output channel, set where any output of the channel survives.
// A task computes 4 output positions x 32 output channels: each weight vector load feeds four
// multiply-adds, each input value two.
std::vector<at::Tensor> conv_term_sums(const at::Tensor& x, const at::Tensor& weight, int64_t chans, int64_t terms,
                                       int64_t unit, int64_t kh, int64_t kw, int64_t oh, int64_t ow,
                                       std::vector<int64_t> stride, std::vector<int64_t> dilation, bool squares,
                                       const c10::optional<ConvTest>& decision) {
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
  const bool decide = decision.has_value();
  at::Tensor s1 = at::empty({batch, len, wide}, x.options());
  at::Tensor s2 = squares && !decide ? at::empty_like(s1) : at::Tensor();
  at::Tensor pruned = decide ? at::empty({batch, len, wide}, x.options().dtype(at::kByte)) : at::Tensor();
  at::Tensor alive = decide ? at::zeros({wide}, x.options().dtype(at::kByte)) : at::Tensor();
  uint8_t* mp = decide ? pruned.data_ptr<uint8_t>() : nullptr;
  uint8_t* lp = decide ? alive.data_ptr<uint8_t>() : nullptr;
  std::vector<int64_t> offset(span);  // of each (channel, dy, dx) from its window's corner
  for (int64_t j = 0; j < span; ++j) {
    offset[j] = j / (kh * kw) * hp * wp + j / kw % kh * dilation[0] * wp + j % kw * dilation[1];
  }
  const float* xp = x.data_ptr<float>();
  const float* wtp = weight.data_ptr<float>();
  float* s1p = s1.data_ptr<float>();
  float* s2p = s2.defined() ? s2.data_ptr<float>() : nullptr;
  const int64_t blocks = padded / (O * kLanes), spots = (len + P - 1) / P;
  const int64_t tasks = batch * groups * blocks * spots;
  at::parallel_for(0, tasks, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, span)), [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t spot = task % spots, block = task / spots % blocks, g = task / (spots * blocks) % groups;
      const int64_t b = task / (spots * blocks * groups);
      const float* xg = xp + (b * groups + g) * terms * unit * hp * wp;
      const float* wg = wtp + g * span * padded + block * O * kLanes;
      int64_t corner[P];
      const int64_t p0 = spot * P, np = std::min<int64_t>(P, len - p0);
      for (int q = 0; q < P; ++q) {
        const int64_t pos = p0 + std::min<int64_t>(q, np - 1);  // past the end: repeat the last, not stored
        corner[q] = pos / ow * stride[0] * wp + pos % ow * stride[1];
      }
      Lanes a1[P][O] = {}, a2[P][O] = {};
      for (int64_t i = 0; i < terms; ++i) {
        Lanes t[P][O] = {};
        for (int64_t j = i * width; j < (i + 1) * width; ++j) {
          Lanes w[O];
          std::memcpy(w, wg + j * padded, sizeof(w));
          const float* xj = xg + offset[j];
          for (int q = 0; q < P; ++q) {
            const float v = xj[corner[q]];
            for (int o = 0; o < O; ++o) t[q][o] += v * w[o];
          }
        }
        for (int q = 0; q < P; ++q) {
          for (int o = 0; o < O; ++o) a1[q][o] += t[q][o], a2[q][o] += t[q][o] * t[q][o];
        }
      }
      for (int q = 0; q < np; ++q) {
        for (int o = 0; o < O; ++o) {
          const int64_t c0 = (block * O + o) * kLanes, n = std::min<int64_t>(kLanes, chans - c0);
          if (n <= 0) continue;
          const int64_t at_out = (b * len + p0 + q) * wide + g * chans + c0;
          std::memcpy(s1p + at_out, &a1[q][o], n * sizeof(float));
          if (s2p) std::memcpy(s2p + at_out, &a2[q][o], n * sizeof(float));
          if (decide) {
            const ConvTest& d = *decision;
            const int64_t pos = p0 + q, y = pos / ow, xx = pos % ow;
            for (int64_t l = 0; l < n; ++l) {
              const int64_t ch = g * chans + c0 + l;
              const float a = d.a[ch], s = a1[q][o][l];
              const float c = d.c ? d.c[b * d.cs[0] + ch * d.cs[1] + y * d.cs[2] + xx * d.cs[3]] : 0.0f;
              const float mean = a * s * d.inv_k + c * d.inv_n;
              const float bound = d.stats ? d.crit[ch * d.crit_stride] *
                                                std::sqrt(a * a * std::max(a2[q][o][l] - s * s * d.inv_k, 0.0f) * d.fpc)
                                          : d.crit[ch * d.crit_stride];
              const bool cut = mean < bound;
              mp[at_out + l] = cut;
              if (!cut && !__atomic_load_n(lp + ch, __ATOMIC_RELAXED)) __atomic_store_n(lp + ch, 1, __ATOMIC_RELAXED);
            }
          }
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
// returns s1 [B, oh*ow, G*C], the pruned mask (uint8, the same layout) and one flag per output
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
  ConvTest d{};
  d.a = scale.data_ptr<float>();
  d.c = offset_4d(offset, d.cs);
  const Critical crit(critical, wide);
  d.crit = crit.p;
  d.crit_stride = crit.stride;
  d.stats = test == 0;
  d.inv_k = 1.0f / terms;
  d.inv_n = 1.0f / n;
  d.fpc = static_cast<float>(n - terms) / (static_cast<float>(n - 1) * terms * (terms - 1));
  return conv_term_sums(x, weight, chans, terms, unit, kh, kw, oh, ow, stride, dilation, d.stats, d);
}

// A convolution site's output from its head (conv_head) and remainder z [B, Cz, oh, ow]
// (contiguous; None: no remainder computed), in one pass: a * (s1 + z) + c, 0 where pruned;
// `slot` None (z has every channel) or z's channel per output channel (-1: not computed, all
// its outputs are pruned). Counts the call as kernels._count_relu does for one stage
// (`term_macs` MACs a term, `big_k` an output's MACs, `computed` the MACs of the head and
// remainder convolutions; `test` 0 = stats). Returns [B, C, oh, ow].
at::Tensor conv_finish(const c10::optional<at::Tensor>& z, const at::Tensor& s1, const at::Tensor& pruned,
                       const c10::optional<at::Tensor>& slot, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& offset, at::Tensor counters, int64_t oh, int64_t ow,
                       int64_t terms, int64_t term_macs, int64_t big_k, int64_t test, double computed) {
  const int64_t batch = s1.size(0), len = s1.size(1), wide = s1.size(2);
  TORCH_CHECK(s1.is_contiguous() && pruned.is_contiguous() && len == oh * ow && pruned.sizes() == s1.sizes(),
              "conv_finish: s1 and pruned [B, oh*ow, C]");
  const bool has_z = z.has_value() && z->defined();
  TORCH_CHECK(!has_z || (z->is_contiguous() && z->scalar_type() == at::kFloat && z->size(0) == batch &&
                         z->size(2) * z->size(3) == len),
              "conv_finish: z [B, Cz, oh, ow] contiguous float32");
  const int64_t cz = has_z ? z->size(1) : 0;
  const int64_t* sp = slot.has_value() && slot->defined() ? slot->data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(sp || !has_z || cz == wide, "conv_finish: z must have every channel without a slot map");
  int64_t cs[4] = {0, 0, 0, 0};
  const float* cp = offset_4d(offset, cs);
  at::Tensor out = at::empty({batch, wide, oh, ow}, s1.options());
  const float* s1p = s1.data_ptr<float>();
  const uint8_t* mp = pruned.data_ptr<uint8_t>();
  const float* zp = has_z ? z->data_ptr<float>() : nullptr;
  const float* ap = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<int64_t> n_pruned{0}, negative{0};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, len));
  at::parallel_for(0, batch * wide, grain, [&](int64_t t0, int64_t t1) {
    int64_t cut = 0, neg = 0;
    for (int64_t plane = t0; plane < t1; ++plane) {
      const int64_t b = plane / wide, ch = plane % wide;
      const int64_t zc = sp ? sp[ch] : ch;
      const float* zr = zp && zc >= 0 ? zp + (b * cz + zc) * len : nullptr;
      const float a = ap[ch];
      float* orow = op + plane * len;
      for (int64_t p = 0; p < len; ++p) {
        const int64_t at_in = (b * len + p) * wide + ch;
        if (mp[at_in]) {
          orow[p] = 0.0f;
          ++cut;
          continue;
        }
        const float c = cp ? cp[b * cs[0] + ch * cs[1] + p / ow * cs[2] + p % ow * cs[3]] : 0.0f;
        const float v = a * (s1p[at_in] + (zr ? zr[p] : 0.0f)) + c;
        orow[p] = v;
        neg += v < 0;
      }
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
