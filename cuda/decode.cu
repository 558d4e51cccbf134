// Decoding with a KV cache on the device (docs/spec.md 8): the CUDA twin of reference/decode.cpp.
// The cache mirrors ref::DecodeCache field by field (elements of the precision); the host keeps the
// lengths (it decides positions, emissions and splits) and the device does the rest. A step is
//   [append + phi on the completed blocks, when a token completes one]
//   dec_split (compression + window splits; appends the new tokens when nothing is emitted)
//   dec_select (Eq. 8-11) -> dec_split (selection splits) -> dec_combine (the merges, Eq. 5),
// the kernels of decode_attn.cu (O_cmp, O_win, O_slc are all merged in dec_combine; dec_select
// merges only the compression branch's statistics, for the scores), the ones after the first
// launched with programmatic dependent launch. docs/cuda_decode.md has the design and the
// measurements.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <numeric>
#include <tuple>

#include "check.hpp"
#include "device.cuh"
#include "kernels.hpp"
#include "measure.hpp"
#include "nsa_cuda.hpp"
#include "plan.hpp"

namespace nsa::cuda {

namespace {


// Keys per split CTA at most: beyond this a branch takes more splits (several waves of CTAs)
// rather than longer ones, so that the tail of a launch stays short.
constexpr int kMaxSplitKeys = 2048;

struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

int device_attr(cudaDeviceAttr a, int device) {
  int v = 0;
  NSA_CUDA_CHECK(cudaDeviceGetAttribute(&v, a, device));
  return v;
}

// Cuts `keys` into at most `parts` splits of a multiple of kDecTile keys (at most kMaxSplitKeys):
// {splits, keys per split}. No keys: one empty split.
std::pair<int, int> cut(int keys, int parts) {
  if (keys <= 0) return {1, kDecTile};
  parts = std::max(1, std::min(parts, (keys + kDecTile - 1) / kDecTile));
  int R = (keys + parts - 1) / parts;
  R = std::min((R + kDecTile - 1) / kDecTile * kDecTile, kMaxSplitKeys);
  return {(keys + R - 1) / R, R};
}

}  // namespace

struct Decoder::Impl {
  Config cfg;
  Options opt;
  ref::KvSharing share;
  int64_t B = 0, capacity = 0;
  std::vector<int64_t> len;  // [B] tokens held per sequence
  DecParams p;               // the cache and the step's buffers; rows, splits per step
  int NBcap = 0;             // selection blocks at capacity
  int sms = 0, optin = 0, ctas_per_sm = 0, waves = 1;  // waves: Options::dec_waves
  bool pdl = false;          // programmatic dependent launch between the step's kernels (sm_90+)
  std::vector<Buffer> buffers;
  Blas blas;  // cuBLAS: phi's GEMMs on the emitted blocks
  // The steps' stream: a blocking one, ordered after the inputs' copies on the legacy stream (a
  // synchronous copy from pageable memory may return before its DMA lands); not the legacy stream
  // itself, which graph capture does not take.
  cudaStream_t stream = nullptr;
  // The step's inputs (room for B rows): per branch keys/values, aliases of the selection's where
  // the branch keeps no ring.
  void* q = nullptr;
  void* k_in[3] = {};
  void* v_in[3] = {};
  float* gates = nullptr;
  int32_t* rows = nullptr;  // [2, B] seq, pos
  int64_t* emit_rows = nullptr;  // [3, B]
  DecEmit emit;
  size_t part_slots = 0;  // items * S the partials have room for
  bool phi_set = false;
  PhiDevice phi_k, phi_v;
  PhiWorkspace ws;
  L2Flush flush;  // the benchmark's (measure.cu)
  KernelChoice prefill_kernels;  // what the last prefill's forward pass ran

  size_t es() const { return size_t(element_size(opt.dtype)); }
  void* alloc(size_t bytes, const char* what) {
    Buffer b;
    b.bytes = bytes;
    if (bytes > 0) {
      b.ptr = device_malloc(bytes, what, "decode cache: ");
      // Zeros, as ref::DecodeCache starts: download() copies whole rows, also those past a
      // sequence's length that no step has written yet (and initcheck then sees no unwritten read).
      NSA_CUDA_CHECK(cudaMemset(b.ptr, 0, bytes));
    }
    buffers.push_back(b);
    return b.ptr;
  }
  void* alloc_e(int64_t n, const char* what) { return alloc(size_t(n) * es(), what); }
  template <class X>
  X* alloc_t(int64_t n, const char* what) {
    return static_cast<X*>(alloc(size_t(n) * sizeof(X), what));
  }
  void release(void* ptr) {
    for (auto& b : buffers)
      if (b.ptr == ptr && ptr) {
        cudaFree(b.ptr);
        b = Buffer{};
      }
  }
  // Host floats -> n device elements at dst + offset elements.
  void put_e(void* dst, int64_t offset, const float* src, int64_t n) {
    if (n <= 0) return;
    const std::vector<char> e = to_elems(opt.dtype, src, size_t(n));
    NSA_CUDA_CHECK(cudaMemcpy(static_cast<char*>(dst) + size_t(offset) * es(), e.data(), e.size(), cudaMemcpyHostToDevice));
  }
  void get_e(const void* src, int64_t offset, float* dst, int64_t n) const {
    if (n <= 0) return;
    std::vector<char> e(size_t(n) * es());
    NSA_CUDA_CHECK(cudaMemcpy(e.data(), static_cast<const char*>(src) + size_t(offset) * es(), e.size(),
                              cudaMemcpyDeviceToHost));
    from_elems(opt.dtype, e.data(), size_t(n), dst);
  }
  float* upload_f(const Tensor<float>& t, const char* what) {
    if (t.empty()) return nullptr;
    float* d = alloc_t<float>(t.numel(), what);
    NSA_CUDA_CHECK(cudaMemcpy(d, t.data(), size_t(t.numel()) * 4, cudaMemcpyHostToDevice));
    return d;
  }
  void* upload_e(const Tensor<float>& t, const char* what) {
    if (t.empty()) return nullptr;
    void* d = alloc_e(t.numel(), what);
    put_e(d, 0, t.data(), t.numel());
    return d;
  }

  // The shapes of the cache's tensors (ref::DecodeCache's), elements per row of each.
  int64_t rk() const { return cfg.Hkv * cfg.dk; }
  int64_t rv() const { return cfg.Hkv * cfg.dv; }

  ~Impl() {
    blas.destroy();
    for (auto& b : buffers)
      if (b.ptr) cudaFree(b.ptr);
    if (stream) cudaStreamDestroy(stream);
  }

  // ---- one step: positions, emissions, splits (host), then the kernels ----
  // Sets the step's rows (row r -> cache sequence seqs[r] at its current length), uploads them and
  // the emission list, and chooses the splits.
  void prepare(const std::vector<int64_t>& seqs) {
    const int Bs = int(seqs.size());
    p.Bs = Bs;
    std::vector<int32_t> rows_h(size_t(2 * Bs));
    std::vector<int64_t> eb, eu, ed;
    int Ncmax = 0, Wmax = 0, Smax = 0, NBs = 0;
    for (int r = 0; r < Bs; ++r) {
      const int64_t b = seqs[size_t(r)], t = len[size_t(b)];
      rows_h[size_t(r)] = int32_t(b);
      rows_h[size_t(Bs + r)] = int32_t(t);
      Ncmax = std::max(Ncmax, int(cfg.cmp_visible(t)));
      Wmax = std::max(Wmax, int(t - cfg.win_start(t) + 1));
      Smax = std::max(Smax, int(std::min(cfg.slc_count, cfg.slc_valid(t)) * cfg.slc_len));
      NBs = std::max(NBs, int(cfg.slc_valid(t)));
      const int64_t s = t + 1, l = cfg.cmp_len;
      if (s >= l && (s - l) % cfg.cmp_stride == 0) {  // block i = (s - l)/d is complete
        const int64_t i = (s - l) / cfg.cmp_stride;
        eb.push_back(b), eu.push_back(i * cfg.cmp_stride), ed.push_back(b * p.Ncap + i);
      }
    }
    p.NBs = NBs;
    emit.M = int(eb.size());
    std::vector<int64_t> em(eb);
    em.insert(em.end(), eu.begin(), eu.end());
    em.insert(em.end(), ed.begin(), ed.end());
    if (Bs > 0) NSA_CUDA_CHECK(cudaMemcpy(rows, rows_h.data(), rows_h.size() * 4, cudaMemcpyHostToDevice));
    if (emit.M > 0) NSA_CUDA_CHECK(cudaMemcpy(emit_rows, em.data(), em.size() * 8, cudaMemcpyHostToDevice));
    p.seq = rows;
    p.pos = rows + Bs;
    emit.rows = emit_rows;
    p.append = emit.M == 0;  // an emitting step appends before phi (dec_append)

    // Splits: about one wave of split CTAs per launch (CTAs resident at once over the SMs), the
    // compression and window branches sharing the first launch in proportion to their keys.
    // Options::dec_waves = k asks for k waves instead (an experiment knob, docs/cuda_decode.md).
    const int items = std::max(1, Bs * p.Hkv), resident = sms * ctas_per_sm * waves;
    const int partsB = std::max(2, resident / items);
    const int pw = std::max(1, int(std::lround(double(partsB) * Wmax / double(std::max(1, Ncmax + Wmax)))));
    std::tie(p.sc, p.rc) = cut(Ncmax, std::max(1, partsB - pw));
    std::tie(p.sw, p.rw) = cut(Wmax, pw);
    std::tie(p.ss, p.rs) = cut(Smax, std::max(1, resident / items));
    const size_t slots = size_t(items) * size_t(p.sc + p.sw + p.ss);
    if (items > 65535) throw ResourceError(cat("decode step: ", Bs, " rows x ", p.Hkv, " groups exceed 65535 items"));
    if (dec_combine_smem(p) > 48 * 1024)
      throw ResourceError(cat("decode step: ", p.sc + p.sw + p.ss, " splits per item need more than 48 KB of shared "
                              "memory in the merge kernel"));
    if (slots > part_slots) {
      release(p.part_ml);
      release(p.part_o);
      p.part_ml = alloc_t<float>(int64_t(slots) * 2 * 16, "decode partial stats");
      p.part_o = alloc_t<float>(int64_t(slots) * 16 * p.dv, "decode partial outputs");
      part_slots = slots;
    }
  }

  // The step's kernels in order, with names for the timed runs.
  StageList stages() {
    StageList st;
    const Precision prec = opt.dtype;
    if (emit.M > 0)
      st.push_back({"append+phi", [this, prec](cudaStream_t s) {
                      dec_append(prec, p, s);
                      if (cfg.compress == CompressKind::Mean) {
                        dec_emit_mean(prec, p, emit, false, s);
                        dec_emit_mean(prec, p, emit, true, s);
                        return;
                      }
                      blas.set_stream(s);
                      const int64_t* dst = emit.rows + 2 * emit.M;
                      dec_emit_gather(prec, p, emit, false, phi_k.pe, ws.X, s);
                      phi_gathered(cfg, prec, emit.M, p.Hkv, p.dk, int(cfg.hidden_k()), phi_k, ws, dst, p.k_cmp, blas.handle, s);
                      dec_emit_gather(prec, p, emit, true, phi_v.pe, ws.X, s);
                      phi_gathered(cfg, prec, emit.M, p.Hkv, p.dv, int(cfg.hidden_v()), phi_v, ws, dst, p.v_cmp, blas.handle, s);
                    }});
    // The first split kernel waits for everything before it (the previous step's merge reads the
    // partials it rewrites); the later kernels start in their predecessor's tail (pdl).
    st.push_back({"cmp_attn+win_attn", [this, prec](cudaStream_t s) { dec_split(prec, p, false, false, s); }});
    st.push_back({"topn", [this](cudaStream_t s) { dec_select(p, NBcap, pdl, s); }});
    st.push_back({"slc_attn", [this, prec](cudaStream_t s) { dec_split(prec, p, true, pdl, s); }});
    st.push_back({"combine", [this, prec](cudaStream_t s) { dec_combine(prec, p, pdl, s); }});
    return st;
  }
  void run(cudaStream_t s) {
    if (p.Bs == 0) return;
    for (auto& [name, fn] : stages()) fn(s);
  }

  PhiDevice upload_phi(const ref::PhiParams<float>& ph) { return cuda::upload_phi(*this, ph); }
};

Decoder::Decoder(const Config& cfg, const ref::KvSharing& share, int64_t B, int64_t capacity, const Options& opt)
    : impl_(new Impl) {
  Impl& I = *impl_;
  try {
    cfg.validate();
    if (B < 0 || capacity < 0)
      throw ConfigError(cat("decode cache: B = ", B, " sequences and capacity = ", capacity, " tokens must be >= 0"));
    if (capacity > (int64_t(1) << 30)) throw ConfigError(cat("decode cache: capacity = ", capacity, " tokens exceeds 2^30"));
    if (opt.dtype == Precision::FP32)
      throw ConfigError("dtype = fp32: the CUDA decode step runs bf16 or fp16 operands (fp32 accumulation)");
    if (cfg.G() > 16) throw ConfigError(cat("G = ", cfg.G(), ": the CUDA decode step holds a group's heads in 16 rows (G <= 16)"));
    if (!mma_compiled(int(cfg.dk), int(cfg.dv)))
      throw ConfigError(cat("head dims dk = ", cfg.dk, ", dv = ", cfg.dv,
                            " are not compiled for the CUDA decode step (NSA_CUDA_DIMS)"));
    std::string why;
    if (!available(&why)) throw CudaError(why);
    NSA_CUDA_CHECK(cudaSetDevice(opt.device));
    I.cfg = cfg, I.opt = opt, I.share = share, I.B = B, I.capacity = capacity;
    I.len.assign(size_t(B), 0);
    I.sms = device_attr(cudaDevAttrMultiProcessorCount, opt.device);
    // Experiment knobs (Options, docs/cuda_decode.md): waves of split CTAs; dec_pdl = false
    // launches the kernels plainly, dec_evict_first = false streams the cache with the default L2
    // policy.
    if (opt.dec_waves < 1) throw ConfigError(cat("dec_waves = ", opt.dec_waves, " is invalid: expected >= 1"));
    I.waves = opt.dec_waves;
    I.pdl = device_attr(cudaDevAttrComputeCapabilityMajor, opt.device) >= 9 && opt.dec_pdl;
    I.p.evict_first = opt.dec_evict_first;
    I.optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, opt.device);
    DecParams& p = I.p;
    static_cast<LayerParams&>(p) = layer_params(cfg);
    p.capacity = capacity;
    p.Ncap = int(cfg.num_cmp_blocks(capacity));
    p.Ncs = std::max(4, (p.Ncap + 3) / 4 * 4);
    if (opt.decode_kernel != -1 && (opt.decode_kernel < 1 || opt.decode_kernel > 3))
      throw ConfigError(cat("decode kernel = ", opt.decode_kernel, " is invalid: expected 1, 2, 3 or -1 (auto)"));
    p.kernel = opt.decode_kernel == -1 ? kDefaultDecodeKernel : opt.decode_kernel;
    p.L = int(std::min(capacity, cfg.cmp_len)), p.W = int(std::min(capacity, cfg.window));
    I.NBcap = capacity > 0 ? int(cfg.slc_valid(capacity - 1)) : 0;
    p.sc = p.sw = p.ss = 1;
    p.jb = dec_select_blocks_per_cta(p);
    if (dec_select_smem(p, I.NBcap) + 16 > size_t(I.optin))  // + its static flag
      throw ResourceError(cat("decode cache: capacity = ", capacity, " tokens needs ", dec_select_smem(p, I.NBcap),
                              " bytes of shared memory in the selection kernel (the top-n over ", I.NBcap,
                              " blocks), more than the device's ", I.optin));
    I.ctas_per_sm = dec_init(opt.dtype, p, I.optin);
    if (I.ctas_per_sm < 1) throw ResourceError("decode step: the split kernel does not fit on an SM");

    // The cache (ref::DecodeCache's tensors).
    p.k_cmp = I.alloc_e(B * p.Ncap * I.rk(), "compressed keys");
    p.v_cmp = I.alloc_e(B * p.Ncap * I.rv(), "compressed values");
    p.k_tail = share.cmp_k ? nullptr : I.alloc_e(B * p.L * I.rk(), "compression key ring");
    p.v_tail = share.cmp_v ? nullptr : I.alloc_e(B * p.L * I.rv(), "compression value ring");
    p.k_slc = I.alloc_e(B * capacity * I.rk(), "key history");
    p.v_slc = I.alloc_e(B * capacity * I.rv(), "value history");
    p.k_win = share.win_k ? nullptr : I.alloc_e(B * p.W * I.rk(), "window key ring");
    p.v_win = share.win_v ? nullptr : I.alloc_e(B * p.W * I.rv(), "window value ring");
    // The step's buffers.
    const int64_t BH = B * cfg.Hq;
    I.q = I.alloc_e(BH * p.dk, "step q");
    I.k_in[1] = I.alloc_e(B * I.rk(), "step k");
    I.v_in[1] = I.alloc_e(B * I.rv(), "step v");
    I.k_in[0] = share.cmp_k ? I.k_in[1] : I.alloc_e(B * I.rk(), "step k_cmp");
    I.v_in[0] = share.cmp_v ? I.v_in[1] : I.alloc_e(B * I.rv(), "step v_cmp");
    I.k_in[2] = share.win_k ? I.k_in[1] : I.alloc_e(B * I.rk(), "step k_win");
    I.v_in[2] = share.win_v ? I.v_in[1] : I.alloc_e(B * I.rv(), "step v_win");
    p.q = I.q;
    for (int c = 0; c < 3; ++c) p.k_new[c] = I.k_in[c], p.v_new[c] = I.v_in[c];
    I.gates = I.alloc_t<float>(BH * 3, "step gates");
    p.gates = I.gates;
    p.o = I.alloc_e(BH * p.dv, "o");
    p.o_cmp = I.alloc_e(BH * p.dv, "o_cmp");
    p.o_slc = I.alloc_e(BH * p.dv, "o_slc");
    p.o_win = I.alloc_e(BH * p.dv, "o_win");
    p.lse_cmp = I.alloc_t<float>(BH, "lse_cmp");
    p.lse_slc = I.alloc_t<float>(BH, "lse_slc");
    p.lse_win = I.alloc_t<float>(BH, "lse_win");
    p.block_idx = I.alloc_t<int32_t>(B * p.Hkv * p.slc_count, "block_idx");
    p.block_scores = I.alloc_t<float>(B * p.Hkv * I.NBcap, "block_scores");
    p.sel_arrive = I.alloc_t<int>(B * p.Hkv, "selection arrival counts");
    if (B > 0) NSA_CUDA_CHECK(cudaMemset(p.sel_arrive, 0, size_t(B * p.Hkv) * sizeof(int)));
    p.scores = I.alloc_t<float>(BH * p.Ncs, "compressed scores");
    I.rows = I.alloc_t<int32_t>(2 * B, "step rows");
    I.emit_rows = I.alloc_t<int64_t>(3 * B, "emitted blocks");
    if (cfg.compress != CompressKind::Mean && B > 0) {
      const int64_t D = std::max(p.dk, p.dv), hc = std::max(cfg.hidden_k(), cfg.hidden_v());
      I.ws.X = I.alloc_e(p.Hkv * B * p.cmp_len * D, "phi workspace X");
      I.ws.H = I.alloc_t<float>(p.Hkv * B * std::max(hc, D), "phi workspace H");
      I.ws.Hb = I.alloc_e(p.Hkv * B * hc, "phi workspace Hb");
      I.ws.Y = I.alloc_t<float>(B * p.Hkv * D, "phi workspace Y");
    }
    I.blas.create();
    NSA_CUDA_CHECK(cudaStreamCreate(&I.stream));
  } catch (...) {
    delete impl_;
    throw;
  }
}

Decoder::~Decoder() { delete impl_; }

const std::vector<int64_t>& Decoder::lengths() const { return impl_->len; }
const Config& Decoder::config() const { return impl_->cfg; }
const KernelChoice& Decoder::prefill_kernels() const { return impl_->prefill_kernels; }
size_t Decoder::device_bytes() const {
  size_t s = 0;
  for (const auto& b : impl_->buffers) s += b.bytes;
  return s;
}

void Decoder::set_phi(const ref::CompressParams<float>& phi) {
  Impl& I = *impl_;
  if (I.cfg.compress == CompressKind::Mean) return;
  I.phi_k = I.upload_phi(phi.k);
  I.phi_v = I.upload_phi(phi.v);
  I.phi_set = true;
}

void Decoder::upload(const ref::DecodeCache<float>& c) {
  Impl& I = *impl_;
  const DecParams& p = I.p;
  if (c.B() != I.B || c.capacity != I.capacity || c.share != I.share || c.cfg.cmp_len != I.cfg.cmp_len ||
      c.cfg.cmp_stride != I.cfg.cmp_stride || c.cfg.window != I.cfg.window || c.cfg.Hkv != I.cfg.Hkv ||
      c.cfg.dk != I.cfg.dk || c.cfg.dv != I.cfg.dv)
    throw InputError(cat("decode cache upload: the host cache (B = ", c.B(), ", capacity ", c.capacity,
                         ") does not match the device cache (B = ", I.B, ", capacity ", I.capacity,
                         ") in its shape, block settings or sharing"));
  auto put = [&](void* dst, const Tensor<float>& t) {
    if (dst) I.put_e(dst, 0, t.data(), t.numel());
  };
  put(p.k_cmp, c.k_cmp), put(p.v_cmp, c.v_cmp), put(p.k_tail, c.k_tail), put(p.v_tail, c.v_tail);
  put(p.k_slc, c.k_slc), put(p.v_slc, c.v_slc), put(p.k_win, c.k_win), put(p.v_win, c.v_win);
  I.len = c.len;
}

ref::DecodeCache<float> Decoder::download() const {
  const Impl& I = *impl_;
  const DecParams& p = I.p;
  ref::DecodeCache<float> c = ref::make_cache<float>(I.cfg, I.share, I.B, I.capacity);
  auto get = [&](const void* src, Tensor<float>& t) {
    if (src) I.get_e(src, 0, t.data(), t.numel());
  };
  get(p.k_cmp, c.k_cmp), get(p.v_cmp, c.v_cmp), get(p.k_tail, c.k_tail), get(p.v_tail, c.v_tail);
  get(p.k_slc, c.k_slc), get(p.v_slc, c.v_slc), get(p.k_win, c.k_win), get(p.v_win, c.v_win);
  c.len = I.len;
  return c;
}

namespace {

// The cache sequences a call addresses (ref::decode's resolve_seqs): `seqs`, or all B in order;
// distinct, in range, one per sequence (or row) of the inputs.
std::vector<int64_t> resolve_seqs(int64_t B, const std::vector<int64_t>& seqs, int64_t count, const char* what) {
  std::vector<int64_t> out = seqs;
  if (out.empty()) {
    out.resize(size_t(B));
    std::iota(out.begin(), out.end(), 0);
  }
  if (int64_t(out.size()) != count)
    throw InputError(cat(what, ": the inputs hold ", count, " sequence(s) but ", out.size(),
                         " cache sequence(s) are addressed (B = ", B, ")"));
  std::vector<char> seen(size_t(B), 0);
  for (int64_t b : out) {
    if (b < 0 || b >= B) throw InputError(cat(what, ": sequence ", b, " is not in the cache (B = ", B, ")"));
    if (seen[size_t(b)]++) throw InputError(cat(what, ": sequence ", b, " is addressed twice"));
  }
  return out;
}

void check_sharing(const ref::KvSharing& cache, const ref::Inputs<float>& in, const char* what) {
  const ref::KvSharing s = ref::kv_sharing(in);
  if (s != cache)
    throw InputError(cat(what, ": the inputs' per-branch keys/values (cmp k/v shared: ", s.cmp_k, "/", s.cmp_v,
                         ", win k/v shared: ", s.win_k, "/", s.win_v, ") differ from the cache's (", cache.cmp_k, "/",
                         cache.cmp_v, ", ", cache.win_k, "/", cache.win_v, ")"));
}

}  // namespace

ref::ForwardResult<float> Decoder::prefill(const ref::Inputs<float>& in, const std::vector<int64_t>& seqs_in) {
  Impl& I = *impl_;
  const DecParams& p = I.p;
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const std::vector<int64_t> seqs = resolve_seqs(I.B, seqs_in, int64_t(cu.size()) - 1, "decode prefill");
  check_sharing(I.share, in, "decode prefill");
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t b = seqs[i];
    if (I.len[size_t(b)] != 0)
      throw InputError(cat("decode prefill: sequence ", b, " already holds ", I.len[size_t(b)],
                           " tokens (prefill fills empty sequences)"));
    if (cu[i + 1] - cu[i] > I.capacity)
      throw ResourceError(cat("decode prefill: ", cu[i + 1] - cu[i], " tokens for sequence ", b,
                              " exceed the cache's capacity of ", I.capacity));
  }
  Options fo = I.opt;
  fo.intermediates = true;
  ref::ForwardResult<float> r = forward(I.cfg, in, fo, &I.prefill_kernels);
  const int64_t l = I.cfg.cmp_len, w = I.cfg.window;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t b = seqs[i], T = cu[i + 1] - cu[i], r0 = cu[i];
    I.put_e(p.k_slc, b * I.capacity * I.rk(), in.key(Branch::Slc).row(r0, 0), T * I.rk());
    I.put_e(p.v_slc, b * I.capacity * I.rv(), in.value(Branch::Slc).row(r0, 0), T * I.rv());
    for (int64_t u = std::max<int64_t>(0, T - l); u < T; ++u) {  // the rings keep the last l (w) tokens
      if (p.k_tail) I.put_e(p.k_tail, (b * p.L + u % l) * I.rk(), in.key(Branch::Cmp).row(r0 + u, 0), I.rk());
      if (p.v_tail) I.put_e(p.v_tail, (b * p.L + u % l) * I.rv(), in.value(Branch::Cmp).row(r0 + u, 0), I.rv());
    }
    for (int64_t u = std::max<int64_t>(0, T - w); u < T; ++u) {
      if (p.k_win) I.put_e(p.k_win, (b * p.W + u % w) * I.rk(), in.key(Branch::Win).row(r0 + u, 0), I.rk());
      if (p.v_win) I.put_e(p.v_win, (b * p.W + u % w) * I.rv(), in.value(Branch::Win).row(r0 + u, 0), I.rv());
    }
    const int64_t c0 = r.cu_cmp[i], nc = r.cu_cmp[i + 1] - c0;
    if (nc > 0) {
      I.put_e(p.k_cmp, b * p.Ncap * I.rk(), r.k_cmp_compressed.row(c0, 0), nc * I.rk());
      I.put_e(p.v_cmp, b * p.Ncap * I.rv(), r.v_cmp_compressed.row(c0, 0), nc * I.rv());
    }
    I.len[size_t(b)] = T;
  }
  return r;
}

ref::StepResult<float> Decoder::step(const ref::Inputs<float>& in, const std::vector<int64_t>& seqs_in) {
  Impl& I = *impl_;
  DecParams& p = I.p;
  const Config& cfg = I.cfg;
  const int64_t Bs = in.N(), Hq = cfg.Hq, Hkv = cfg.Hkv, n = cfg.slc_count, ls = cfg.slc_len;
  if (!in.cu_seqlens.empty())
    throw InputError("decode step: the inputs hold one token per stepped sequence; cu_seqlens must be empty");
  const std::vector<int64_t> seqs = resolve_seqs(I.B, seqs_in, Bs, "decode step");
  check_sharing(I.share, in, "decode step");
  for (int64_t b : seqs)
    if (I.len[size_t(b)] + 1 > I.capacity)
      throw ResourceError(cat("decode step: sequence ", b, " holds ", I.len[size_t(b)],
                              " tokens; 1 more exceeds the cache's capacity of ", I.capacity));
  ref::StepResult<float> res;
  res.pos.resize(size_t(Bs));
  for (int64_t r = 0; r < Bs; ++r) res.pos[size_t(r)] = I.len[size_t(seqs[size_t(r)])];
  if (Bs == 0) return res;
  bool emits = false;
  for (int64_t t : res.pos)
    emits = emits || (t + 1 >= cfg.cmp_len && (t + 1 - cfg.cmp_len) % cfg.cmp_stride == 0);
  if (emits && cfg.compress != CompressKind::Mean && !I.phi_set) set_phi(in.phi);

  // Inputs: q, the new token's keys/values per branch (those with a ring of their own), gates.
  I.put_e(I.q, 0, in.q.data(), in.q.numel());
  I.put_e(I.k_in[1], 0, in.key(Branch::Slc).data(), Bs * I.rk());
  I.put_e(I.v_in[1], 0, in.value(Branch::Slc).data(), Bs * I.rv());
  for (Branch c : {Branch::Cmp, Branch::Win}) {  // branches with a ring of their own
    if (I.k_in[int(c)] != I.k_in[1]) I.put_e(I.k_in[int(c)], 0, in.key(c).data(), Bs * I.rk());
    if (I.v_in[int(c)] != I.v_in[1]) I.put_e(I.v_in[int(c)], 0, in.value(c).data(), Bs * I.rv());
  }
  res.gates = ref::compute_gates(cfg, in);
  NSA_CUDA_CHECK(cudaMemcpy(I.gates, res.gates.data(), size_t(res.gates.numel()) * 4, cudaMemcpyHostToDevice));

  I.prepare(seqs);
  I.run(I.stream);
  NSA_CUDA_CHECK(cudaStreamSynchronize(I.stream));

  auto get_e = [&](const void* src, Shape shape) {
    Tensor<float> t(std::move(shape));
    I.get_e(src, 0, t.data(), t.numel());
    return t;
  };
  auto get_f = [&](const float* src, Shape shape) {
    Tensor<float> t(std::move(shape));
    NSA_CUDA_CHECK(cudaMemcpy(t.data(), src, size_t(t.numel()) * 4, cudaMemcpyDeviceToHost));
    return t;
  };
  res.o = get_e(p.o, {Bs, Hq, cfg.dv});
  res.o_branch[0] = get_e(p.o_cmp, {Bs, Hq, cfg.dv});
  res.o_branch[1] = get_e(p.o_slc, {Bs, Hq, cfg.dv});
  res.o_branch[2] = get_e(p.o_win, {Bs, Hq, cfg.dv});
  res.lse[0] = get_f(p.lse_cmp, {Bs, Hq});
  res.lse[1] = get_f(p.lse_slc, {Bs, Hq});
  res.lse[2] = get_f(p.lse_win, {Bs, Hq});
  res.block_idx = Tensor<int32_t>({Bs, Hkv, n});
  NSA_CUDA_CHECK(cudaMemcpy(res.block_idx.data(), p.block_idx, size_t(res.block_idx.numel()) * 4,
                            cudaMemcpyDeviceToHost));
  res.block_scores = get_f(p.block_scores, {Bs, Hkv, int64_t(p.NBs)});

  // What each row's step read (ref::StepTokens), from the device's selection.
  res.tokens.resize(size_t(Bs));
  for (int64_t r = 0; r < Bs; ++r) {
    const int64_t t = res.pos[size_t(r)];
    ref::StepTokens& tok = res.tokens[size_t(r)];
    tok.cmp = double(cfg.cmp_visible(t));
    double slc = 0;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t m = 0; m < n; ++m) {
        const int64_t j = res.block_idx(r, g, m);
        if (j >= 0 && j * ls <= t) slc += double(std::min(ls, t + 1 - j * ls));
      }
    tok.slc = slc / double(Hkv);
    tok.win = double(t - cfg.win_start(t) + 1);
    const int64_t s = t + 1;
    tok.emit = s >= cfg.cmp_len && (s - cfg.cmp_len) % cfg.cmp_stride == 0 ? double(cfg.cmp_len) : 0.0;
    tok.full = double(s);
  }
  for (int64_t b : seqs) ++I.len[size_t(b)];
  return res;
}


ref::DecodeRun<float> decode_workload(const Config& cfg, const ref::Inputs<float>& in,
                                      const std::vector<int64_t>& prefix, const Options& opt,
                                      KernelChoice* prefill_kernels) {
  const std::vector<int64_t> cu = in.seqlens_or_single();
  const int64_t B = int64_t(cu.size()) - 1;
  int64_t Tmax = 0;
  ref::ForwardResult<float> out = ref::decode_outputs(cfg, in, prefix, &Tmax);

  ref::DecodeRun<float> run;
  Decoder dec(cfg, ref::kv_sharing(in), B, Tmax, opt);
  if (cfg.compress != CompressKind::Mean) dec.set_phi(in.phi);
  ref::RowGather<float> gather(in);
  // The prefill: the CUDA forward pass on the non-empty prompts.
  std::vector<int64_t> rows, cu_p{0}, pre_seqs;
  for (int64_t b = 0; b < B; ++b) {
    if (prefix[size_t(b)] == 0) continue;
    for (int64_t t = 0; t < prefix[size_t(b)]; ++t) rows.push_back(cu[b] + t);
    cu_p.push_back(int64_t(rows.size()));
    pre_seqs.push_back(b);
  }
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  if (!rows.empty()) {
    const ref::ForwardResult<float> pre = dec.prefill(gather.take(rows, cu_p), pre_seqs);
    if (prefill_kernels) *prefill_kernels = dec.prefill_kernels();
    for (size_t i = 0; i < rows.size(); ++i) ref::copy_outputs(pre, int64_t(i), out, rows[i]);
  }
  run.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();

  std::vector<int64_t> active;
  for (int64_t k = 0; ref::next_step(cu, prefix, k, active, rows); ++k) {
    const ref::Inputs<float>& step_in = gather.take(rows);
    const auto t1 = clock::now();
    const ref::StepResult<float> step = dec.step(step_in, active);
    run.step_seconds += std::chrono::duration<double>(clock::now() - t1).count();
    ++run.step_calls;
    for (size_t i = 0; i < rows.size(); ++i) {
      ref::copy_outputs(step, int64_t(i), out, rows[i]);
      run.steps.push_back({active[i], step.pos[i], step.tokens[i]});
    }
  }

  run.cache = dec.download();
  ref::compressed_from_cache(run.cache, out);
  run.out = std::move(out);
  return run;
}

// ---------------------------------------------------------------- the benchmark
namespace {

// The step's kernels captured as one CUDA graph on stream s (one launch instead of four or five);
// nullptr when the capture fails, with a warning on stderr and the error cleared (the eager
// timing stands alone then).
cudaGraphExec_t capture_step(Decoder::Impl& I, cudaStream_t s) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  std::string why;
  NSA_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  try {
    I.run(s);
  } catch (const std::exception& x) {
    why = x.what();
  }
  const cudaError_t e = cudaStreamEndCapture(s, &graph);
  if (e != cudaSuccess && why.empty()) why = cudaGetErrorString(e);
  if (e == cudaSuccess && graph) {
    const cudaError_t ie = cudaGraphInstantiate(&exec, graph, 0);
    if (ie != cudaSuccess) exec = nullptr, why = cudaGetErrorString(ie);
  }
  if (graph) cudaGraphDestroy(graph);
  cudaGetLastError();
  if (!exec) std::cerr << "decode bench: the step was not captured as a CUDA graph (" << why << "); eager timing only\n";
  return exec;
}

// Median latency of the step's kernels (events around them, the L2 flushed before each repeat),
// launched one by one (eager) and as one CUDA graph, and of each kernel (eager).
DecodeTiming time_step(Decoder::Impl& I, int warmup, int reps) {
  const StageList st = I.stages();
  NSA_CUDA_CHECK(cudaDeviceSynchronize());  // the cache's fills (legacy stream) are done
  cudaStream_t s = I.stream;
  for (int i = 0; i < warmup; ++i) I.run(s);
  NSA_CUDA_CHECK(cudaStreamSynchronize(s));
  // One repeat: the flush (it also gives the host time to queue the launches before the GPU
  // reaches them), then the step between events.
  std::vector<double> eager, graph;
  for (int r = 0; r < reps; ++r) eager.push_back(flushed_ms(I.flush, r, s, [&] { I.run(s); }));
  cudaGraphExec_t exec = capture_step(I, s);
  if (exec) {
    for (int i = 0; i < warmup; ++i) NSA_CUDA_CHECK(cudaGraphLaunch(exec, s));
    for (int r = 0; r < reps; ++r)
      graph.push_back(flushed_ms(I.flush, r, s, [&] { NSA_CUDA_CHECK(cudaGraphLaunch(exec, s)); }));
    cudaGraphExecDestroy(exec);
  }
  StageMedians per;
  for (int r = 0; r < reps; ++r) {
    I.flush(r, s);
    per.add(run_stages_timed(st, s));
  }
  DecodeTiming t;
  t.ms_eager = median(eager);
  t.ms_graph = median(graph);
  t.ms = graph.empty() ? t.ms_eager : t.ms_graph;
  t.stages = per.medians();
  t.splits_cmp = I.p.sc, t.splits_win = I.p.sw, t.splits_slc = I.p.ss;
  t.keys_cmp = I.p.rc, t.keys_win = I.p.rw, t.keys_slc = I.p.rs;
  t.kernel = I.p.kernel;
  t.pdl = I.pdl;
  t.evict_first = I.p.evict_first;
  return t;
}

}  // namespace

DecodeBench bench_decode(const Config& cfg, int64_t B, int64_t s, const Options& opt, int warmup, int reps,
                         uint64_t seed) {
  if (B < 1 || s < 1 || reps < 1 || warmup < 0)
    throw ConfigError(cat("bench_decode: B = ", B, ", s = ", s, ", reps = ", reps, ", warmup = ", warmup,
                          ": expected B, s, reps >= 1 and warmup >= 0"));
  DecodeBench res;
  res.pos = s;
  res.pos_emit = s;  // the next position whose token completes a compressed block
  while (!(res.pos_emit + 1 >= cfg.cmp_len && (res.pos_emit + 1 - cfg.cmp_len) % cfg.cmp_stride == 0)) ++res.pos_emit;
  if (res.pos + 1 >= cfg.cmp_len && (res.pos + 1 - cfg.cmp_len) % cfg.cmp_stride == 0) ++res.pos;
  const int64_t capacity = std::max(res.pos, res.pos_emit) + 1;
  Decoder dec(cfg, ref::KvSharing{}, B, capacity, opt);
  Decoder::Impl& I = *dec.impl_;
  DecParams& p = I.p;
  const Precision prec = opt.dtype;
  fill_normal_elems(prec, p.k_slc, B * capacity * I.rk(), seed + 1);
  fill_normal_elems(prec, p.v_slc, B * capacity * I.rv(), seed + 2);
  fill_normal_elems(prec, p.k_cmp, B * p.Ncap * I.rk(), seed + 3);
  fill_normal_elems(prec, p.v_cmp, B * p.Ncap * I.rv(), seed + 4);
  fill_normal_elems(prec, I.q, B * cfg.Hq * cfg.dk, seed + 5);
  fill_normal_elems(prec, I.k_in[1], B * I.rk(), seed + 6);
  fill_normal_elems(prec, I.v_in[1], B * I.rv(), seed + 7);
  fill_uniform_floats(I.gates, B * cfg.Hq * 3, seed + 8);
  if (cfg.compress != CompressKind::Mean) dec.set_phi(ref::random_compress_params<float>(cfg, seed));
  I.flush.allocate(opt.device);
  std::vector<int64_t> all(static_cast<size_t>(B));
  std::iota(all.begin(), all.end(), 0);
  for (int kind = 0; kind < 2; ++kind) {
    std::fill(I.len.begin(), I.len.end(), kind == 0 ? res.pos : res.pos_emit);
    I.prepare(all);
    (kind == 0 ? res.step : res.emit) = time_step(I, warmup, reps);
  }
  res.device_bytes = dec.device_bytes();
  return res;
}

}  // namespace nsa::cuda
