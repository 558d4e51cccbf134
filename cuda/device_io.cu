// Plan::bind_device (nsa_cuda.hpp): a plan that reads its inputs from and writes o to memory the
// caller owns, for the Python binding's CUDA tensors: no copy in or out, nothing synchronous, so
// the forward pass runs on the caller's stream and can be captured in a CUDA graph.
#include "plan.hpp"

namespace nsa::cuda {

void Plan::bind_device(const DeviceIO& io) {
  Impl& I = *impl_;
  FwdParams& p = I.p;
  if (!io.q || !io.k || !io.v || !io.gates || !io.o)
    throw InputError("bind_device: q, k, v, gates and o are required (gates all ones: a buffer of ones)");
  if (I.has_bwd) throw ConfigError("bind_device: the plan was made with Options::backward; bind a forward plan");
  if (I.gate_source == Impl::GateSource::Mlp)
    throw ConfigError("bind_device: the plan computes its gates from the gate MLP; give the gates instead");
  // The caller's runtime (PyTorch's) keeps its own current device; this library's is set here so
  // that run() launches on the plan's device whichever device was used last.
  NSA_CUDA_CHECK(cudaSetDevice(I.opt.device));
  p.q = io.q;
  p.k_cmp = p.k_slc = p.k_win = io.k;
  p.v_cmp = p.v_slc = p.v_win = io.v;
  p.gates = io.gates;
  I.gate_source = Impl::GateSource::Given;
  p.o = io.o;
  if (I.cfg.compress != CompressKind::Mean) {
    for (auto [dst, src] : {std::pair{&I.phi_k, &io.phi_k}, std::pair{&I.phi_v, &io.phi_v}}) {
      const bool linear = I.cfg.compress == CompressKind::Linear;
      if (!src->pe || (linear ? !src->w : !src->w1 || !src->b1 || !src->w2) || !(linear ? src->b : src->b2))
        throw InputError(cat("bind_device: phi's ", to_string(I.cfg.compress), " parameters are required"));
      *dst = PhiDevice{src->pe, src->w, src->b, src->w1, src->b1, src->w2, src->b2};
    }
  }
}

}  // namespace nsa::cuda
