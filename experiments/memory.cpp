// The command line's memory checks: what the machine (or the container) has, and budgets that
// refuse a run before it allocates.
#include "cli.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

namespace nsa::cli {

// ---- Memory -----------------------------------------------------------------------------------

namespace {
// The first number in a file (cgroup limits: a byte count, or "max" for none).
double read_number(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (!(f >> s)) return -1;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  return end && *end == '\0' && v >= 0 ? v : -1;
}
}  // namespace

AvailableMemory available_memory() {
  AvailableMemory a{std::numeric_limits<double>::infinity(), "unknown"};
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  double kb;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") {
      a = {kb * 1024.0, "MemAvailable in /proc/meminfo"};
      break;
    }
  // A container's limit may be far below the machine's: cgroup v2, else v1.
  for (const auto& [limit, usage] : {std::pair{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
                                     {"/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                      "/sys/fs/cgroup/memory/memory.usage_in_bytes"}}) {
    const double lim = read_number(limit), use = read_number(usage);
    if (lim >= 0 && use >= 0 && lim < 1e18) {
      if (lim - use < a.bytes) a = {std::max(lim - use, 0.0), cat("the cgroup's limit in ", limit, " less its usage")};
      break;
    }
  }
  if (const char* cap = std::getenv("NSA_MAX_MEMORY")) {
    char* end = nullptr;
    const double v = std::strtod(cap, &end);
    if (!(end && *end == '\0' && v >= 0))
      throw ConfigError(cat("NSA_MAX_MEMORY = '", cap, "' is invalid: expected a number of bytes"));
    if (v < a.bytes) a = {v, "the environment variable NSA_MAX_MEMORY"};
  }
  return a;
}

double available_memory_bytes() { return available_memory().bytes; }

std::string human_bytes(double b) {
  const char* units[] = {"bytes", "kB", "MB", "GB", "TB", "PB"};
  int u = 0;
  while (b >= 1000 && u < 5) b /= 1000, ++u;
  std::ostringstream os;
  os << std::setprecision(u ? 3 : 15) << b << " " << units[u];
  return os.str();
}

double MemoryBudget::total() const {
  double t = 0;
  for (const auto& p : parts_) t += p.second;
  return t;
}

void MemoryBudget::require() const {
  const double need = total();
  const AvailableMemory have = available_memory();
  if (need <= have.bytes) return;
  std::string parts;
  for (const auto& p : parts_) parts += cat(parts.empty() ? "" : ", ", p.first, " ", human_bytes(p.second));
  throw ResourceError(cat("not enough memory: this run needs ", std::fixed, std::setprecision(0), need, " bytes (",
                          human_bytes(need), ": ", parts, "), but ", have.bytes, " bytes (", human_bytes(have.bytes),
                          ") are available (", have.source, "); nothing was computed"));
}

json MemoryBudget::to_json() const {
  json parts = json::object();
  for (const auto& p : parts_) parts[p.first] = p.second;
  return {{"estimate_bytes", total()}, {"parts", parts}};
}

double peak_rss_bytes() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;  // kB on Linux
}

json memory_report(const Workload& w) {
  json j = w.memory;
  j["peak_rss_bytes"] = peak_rss_bytes();
  return j;
}

void require_memory(double bytes, const std::string& what) {
  MemoryBudget b;
  b.add(what, bytes);
  b.require();
}

}  // namespace nsa::cli
