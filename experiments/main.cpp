// `nsa`: one executable, git-style subcommands (docs/interface.md). Every failure becomes one line on
// stderr naming the problem and a non-zero exit: 2 for usage errors, 1 for everything else.
#include <cstring>
#include <iostream>
#include <new>

#include "cli.hpp"
#include "commands.hpp"

namespace {

struct Subcommand {
  const char* name;
  const char* summary;
  int (*run)(const nsa::cli::Args&);
};

const Subcommand kSubcommands[] = {
    {"forward", "NSA forward pass: outputs, branch outputs, LSE, gates, selected blocks, scores", nsa::cli::cmd_forward},
    {"full", "full causal attention (the baseline)", nsa::cli::cmd_full},
    {"decode", "NSA decoding through a KV cache: forward's outputs, token by token; cache size, bytes per step", nsa::cli::cmd_decode},
    {"backward", "NSA backward pass: gradients of q, k/v per branch, gates, phi, gate MLP given dL/do",
     nsa::cli::cmd_backward},
    {"gradcheck", "check `nsa backward`'s files against finite differences of the forward pass",
     nsa::cli::cmd_gradcheck},
    {"compare", "compare two .npy files or output folders (max abs, relative L2, PASS/FAIL)", nsa::cli::cmd_compare},
    {"gen", "generate a synthetic workload (q, k, v, ...)", nsa::cli::cmd_gen},
    {"bench", "time NSA forward and backward against full attention", nsa::cli::cmd_bench},
    {"sweep", "a grid of NSA settings x workloads: recall, mass, error, retrieval, FLOPs, traffic (CSV, JSON)", nsa::cli::cmd_sweep},
    {"train", "trainability: learn phi and the gates on needle retrieval through the backward pass", nsa::cli::cmd_train},
    {"recall", "NSA's selected blocks against the exact-attention oracle, beside other selectors", nsa::cli::cmd_recall},
    {"locality", "how blockwise exact attention is: top-k blocks vs tokens, autocorrelation, distance",
     nsa::cli::cmd_locality},
    {"traffic", "memory traffic and roofline model: tokens, bytes, FLOPs per branch, decode and prefill",
     nsa::cli::cmd_traffic},
    {"simulate", "trace-driven memory simulation of a selection: L2 and HBM bytes per branch, reuse, predicted time",
     nsa::cli::cmd_simulate},
};

void print_help() {
  std::cout << "usage: nsa <subcommand> [options]   (nsa <subcommand> --help for its options)\n\n"
               "Native Sparse Attention: exact CPU reference, CUDA path and research tools.\n\nSubcommands:\n";
  for (const auto& s : kSubcommands) std::cout << "  " << s.name << std::string(10 - std::strlen(s.name), ' ') << s.summary << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    print_help();
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  const Subcommand* sub = nullptr;
  for (const auto& s : kSubcommands)
    if (name == s.name) sub = &s;
  if (!sub) {
    std::cerr << "nsa: unknown subcommand '" << name << "'; run 'nsa --help' for the list\n";
    return 2;
  }
  const nsa::cli::Args args(argv + 2, argv + argc);
  try {
    return sub->run(args);
  } catch (const nsa::cli::HelpShown&) {
    return 0;
  } catch (const nsa::cli::UsageError& e) {
    std::cerr << "nsa " << name << ": " << e.what() << "\nTry 'nsa " << name << " --help'.\n";
    return 2;
  } catch (const nsa::Error& e) {
    std::cerr << "nsa " << name << ": error: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "nsa " << name << ": error: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "nsa " << name << ": error: " << e.what() << "\n";
    return 1;
  }
}
