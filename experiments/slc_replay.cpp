// nsa_slc_replay: the selection-attention kernel alone on a given selection, for validating
// `nsa simulate` against Nsight Compute's counters (docs/simulate.md, scripts/validate_simulator.sh):
//   ncu --kernel-name regex:slc_attn --launch-count 1 ... nsa_slc_replay --block-idx sel/block_idx.npy --out r.json
// Runs the kernel the forward pass would run (cuda/slc_replay.hpp) once (the profiled launch), then
// --reps timed launches with the L2 flushed before each; writes the device, the launch shape and
// the times as JSON.
#include <algorithm>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "npy.hpp"
#include "slc_replay.hpp"

int main(int argc, char** argv) {
  using namespace nsa;
  std::map<std::string, std::string> a{{"--Hq", "64"},        {"--dk", "128"},         {"--dv", "128"},
                                       {"--slc-len", "64"},   {"--init-blocks", "1"},  {"--local-blocks", "2"},
                                       {"--dtype", "bf16"},   {"--reps", "5"}};
  const char* usage =
      "usage: nsa_slc_replay --block-idx FILE.npy --out FILE.json [--Hq 64 --dk 128 --dv 128 --slc-len 64\n"
      "       --init-blocks 1 --local-blocks 2 --dtype bf16 --reps 5]   (Hkv and n come from the file)\n";
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      std::cout << usage;
      return 0;
    }
    if (i + 1 >= argc || k.rfind("--", 0) != 0) {
      std::cerr << "nsa_slc_replay: '" << k << "' needs a value\n" << usage;
      return 2;
    }
    if (k != "--block-idx" && k != "--out" && !a.count(k)) {
      std::cerr << "nsa_slc_replay: unknown option '" << k << "'\n" << usage;
      return 2;
    }
    a[k] = argv[i + 1];
  }
  if (!a.count("--block-idx") || !a.count("--out")) {
    std::cerr << usage;
    return 2;
  }
  try {
    auto num = [&](const char* k) {
      size_t end = 0;
      const long long v = std::stoll(a[k], &end);
      if (end != a[k].size()) throw ConfigError(cat(k, " = '", a[k], "' is not an integer"));
      return int64_t(v);
    };
    Tensor<int32_t> bi = load_npy<int32_t>(a["--block-idx"]);
    const Shape sh = bi.shape();
    if (sh.size() != 3 && sh.size() != 4)
      throw InputError(cat(a["--block-idx"], ": shape ", shape_str(sh), " is not [T, Hkv, n] or [B, T, Hkv, n]"));
    const int64_t B = sh.size() == 4 ? sh[0] : 1, T = sh[sh.size() - 3];
    Config c;
    c.Hq = num("--Hq"), c.Hkv = sh[sh.size() - 2], c.dk = num("--dk"), c.dv = num("--dv");
    c.slc_len = num("--slc-len"), c.slc_count = sh.back();
    c.init_blocks = num("--init-blocks"), c.local_blocks = num("--local-blocks");
    c.validate();
    std::vector<int64_t> cu;
    for (int64_t b = 0; b <= B; ++b) cu.push_back(b * T);
    const cuda::Precision prec = cuda::parse_precision(a["--dtype"]);
    const cuda::SlcReplay r =
        cuda::replay_selection(c, std::move(bi).reshaped({B * T, c.Hkv, c.slc_count}), cu, prec, int(num("--reps")));
    std::vector<double> ms = r.ms;
    std::sort(ms.begin(), ms.end());
    const double med = ms.empty() ? 0 : ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
    const nlohmann::json j = {{"block_idx", a["--block-idx"]}, {"device", r.device},       {"sms", r.sms},
                              {"l2_bytes", r.l2_bytes},         {"smem_per_sm", r.smem_per_sm},
                              {"kernel", r.kernel},             {"warps_per_cta", r.warps_per_cta},
                              {"smem_per_cta", r.smem_per_cta}, {"ctas", r.ctas},
                              {"ctas_per_sm_smem", r.ctas_per_sm_smem},
                              {"T", T}, {"batch", B}, {"Hq", c.Hq}, {"Hkv", c.Hkv}, {"dk", c.dk}, {"dv", c.dv},
                              {"n", c.slc_count}, {"slc_len", c.slc_len}, {"dtype", a["--dtype"]},
                              {"ms", r.ms}, {"median_ms", med}};
    std::ofstream(a["--out"]) << j.dump(2) << "\n";
    std::cout << "slc_replay: " << r.device << ", slc_attn " << r.kernel << ", " << r.warps_per_cta << " warps x "
              << r.ctas << " CTAs (" << r.smem_per_cta << " B shared each, " << r.ctas_per_sm_smem
              << " per SM by shared memory), median " << med << " ms\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "nsa_slc_replay: error: " << e.what() << "\n";
    return 1;
  }
}
