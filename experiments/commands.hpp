// The subcommands of `nsa`, one function each (argv after the subcommand name); main.cpp routes.
#pragma once

#include <string>
#include <vector>

#include <boost/program_options.hpp>

namespace nsa::cli {

using Args = std::vector<std::string>;

int cmd_forward(const Args& args);  // cmd_forward.cpp
int cmd_full(const Args& args);     // cmd_forward.cpp
int cmd_decode(const Args& args);   // cmd_decode.cpp
int cmd_backward(const Args& args);   // cmd_backward.cpp
int cmd_gradcheck(const Args& args);  // cmd_backward.cpp
int cmd_compare(const Args& args);  // cmd_compare.cpp
int cmd_gen(const Args& args);      // cmd_gen.cpp
int cmd_bench(const Args& args);    // cmd_bench.cpp
int cmd_sweep(const Args& args);     // cmd_sweep.cpp
int cmd_train(const Args& args);     // cmd_train.cpp
int cmd_recall(const Args& args);    // cmd_recall.cpp
int cmd_locality(const Args& args);  // cmd_locality.cpp
int cmd_traffic(const Args& args);   // cmd_traffic.cpp
int cmd_simulate(const Args& args);  // cmd_simulate.cpp

// Throws ConfigError unless --device is cpu (for commands without a CUDA path).
void require_cpu_device(const boost::program_options::variables_map& vm, const char* cmd);
// True for --device cuda when this build has the CUDA path and a GPU is usable (else throws a
// ConfigError or CudaError saying which is missing); false for cpu.
bool use_cuda_device(const boost::program_options::variables_map& vm, const char* cmd);

}  // namespace nsa::cli
