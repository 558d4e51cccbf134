// `nsa train`: the trainability experiment (train.hpp): learns phi and the gates on a synthetic
// retrieval objective through the reference backward pass. Writes train.csv and train.json (one
// row per step, fixed columns), the learned phi as a --compress-params folder (phi/), the gate
// MLP's weights (gate_w.npy, gate_b.npy) and config.json into --out.
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.hpp"
#include "commands.hpp"
#include "train.hpp"

namespace nsa::cli {

namespace fs = std::filesystem;

namespace {

const char* kTrainColumns = "step,loss,needle_found,recall,mass,gate_cmp,gate_slc,gate_win,grad_norm,seconds";

}  // namespace

int cmd_train(const Args& args) {
  Command cmd("train",
              "Trainability: learn the compression MLP phi and the gates by gradient descent (the reference\n"
              "backward pass) on needle retrieval: each step a fresh batch of needle workloads, the question\n"
              "rows' outputs pulled towards the needle's answer. Logs loss, needle_found, recall, mass and the\n"
              "gates per step (train.csv, train.json); writes the learned phi as a --compress-params folder\n"
              "(phi/) for nsa forward and nsa sweep.");
  po::options_description d("Data (needle workloads, nsa gen --workload needle)");
  d.add_options()("T", po::value<int64_t>()->default_value(1024), "tokens per sequence")(
      "batch", po::value<int64_t>()->default_value(4), "sequences per step")(
      "Hq", po::value<int64_t>()->default_value(4), "query heads")(
      "Hkv", po::value<int64_t>()->default_value(1), "key/value heads")(
      "dk", po::value<int64_t>()->default_value(32), "query/key head dim")(
      "dv", po::value<int64_t>()->default_value(32), "value head dim")(
      "depth-max", po::value<double>()->default_value(0.8), "needle depths ~ U[0, depth-max]")(
      "needle-len", po::value<int64_t>()->default_value(16), "tokens the needle spans")(
      "needle-strength", po::value<double>()->default_value(8.0), "the needle's logit margin (haystack-logit std)")(
      "questions", po::value<int64_t>()->default_value(16), "question rows at the end of each sequence");
  po::options_description t("Training");
  t.add_options()("steps", po::value<int64_t>()->default_value(300), "gradient steps")(
      "lr", po::value<double>()->default_value(3e-3), "Adam learning rate")(
      "learn", po::value<std::string>()->default_value("phi,gates"), "what is learned: phi, gates, or both")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores)")(
      "log-every", po::value<int64_t>()->default_value(0), "print every N steps (0: about 20 lines)");
  cmd.add(d);
  cmd.add(nsa_options());
  cmd.add(t);
  cmd.add(output_options());
  const auto vm = cmd.parse(args);
  if (!vm.count("out")) throw UsageError("the option '--out' is required");
  if (vm.count("compress-params"))
    throw UsageError("--compress-params: training starts from phi drawn from --seed (the sweep's untrained phi)");
  TrainSpec s;
  s.cfg = make_config(vm, vm["Hq"].as<int64_t>(), vm["Hkv"].as<int64_t>(), vm["dk"].as<int64_t>(),
                      vm["dv"].as<int64_t>());
  s.data.T = vm["T"].as<int64_t>();
  s.data.needle_len = vm["needle-len"].as<int64_t>();
  s.data.needle_strength = vm["needle-strength"].as<double>();
  s.data.questions = vm["questions"].as<int64_t>();
  s.batch = vm["batch"].as<int64_t>();
  s.depth_max = vm["depth-max"].as<double>();
  s.steps = vm["steps"].as<int64_t>();
  s.lr = vm["lr"].as<double>();
  s.seed = vm["seed"].as<uint64_t>();
  const auto learn = parse_list<std::string>(vm["learn"].as<std::string>(), "learn");
  s.learn_phi = s.learn_gates = false;
  for (const auto& x : learn) {
    if (x == "phi") s.learn_phi = true;
    else if (x == "gates") s.learn_gates = true;
    else throw ConfigError(cat("learn: '", x, "' is not one of: phi, gates"));
  }
  if (s.learn_phi && s.cfg.compress == CompressKind::Mean)
    throw ConfigError("learn = phi with compress = mean: mean pooling has no parameters (use mlp or linear)");
  validate(s);
  ref::set_threads(vm["threads"].as<int>());
  OutputDir out(vm["out"].as<std::string>());
  OutputDir phi_out((fs::path(out.dir()) / "phi").string());

  const int64_t every = vm["log-every"].as<int64_t>() > 0 ? vm["log-every"].as<int64_t>() : std::max<int64_t>(1, s.steps / 20);
  std::cout << "train: " << s.steps << " steps of " << s.batch << " needle sequences x " << s.data.T << " tokens; "
            << "l=" << s.cfg.cmp_len << " d=" << s.cfg.cmp_stride << " l'=" << s.cfg.slc_len << " n=" << s.cfg.slc_count
            << " w=" << s.cfg.window << " phi=" << to_string(s.cfg.compress) << "; learning " << vm["learn"].as<std::string>()
            << "\n"
            << std::flush;
  const TrainResult r = train(s, [&](const StepLog& l) {
    if (l.step % every == 0 || l.step == s.steps - 1)
      std::cout << "step " << std::setw(5) << l.step << "  loss " << std::fixed << std::setprecision(4) << l.loss
                << "  needle_found " << std::setprecision(3) << l.needle_found << "  recall " << l.recall << "  gates "
                << l.gate[0] << " " << l.gate[1] << " " << l.gate[2] << "  (" << std::setprecision(2) << l.seconds
                << " s)\n"
                << std::defaultfloat << std::flush;
  });

  std::ostringstream csv;
  csv << kTrainColumns << "\n";
  json records = json::array();
  for (const auto& l : r.log) {
    csv << l.step << "," << csv_num(l.loss) << "," << csv_num(l.needle_found) << "," << csv_num(l.recall) << "," << csv_num(l.mass) << ","
        << csv_num(l.gate[0]) << "," << csv_num(l.gate[1]) << "," << csv_num(l.gate[2]) << "," << csv_num(l.grad_norm) << ","
        << csv_num(l.seconds) << "\n";
    records.push_back({{"step", l.step}, {"loss", l.loss}, {"needle_found", l.needle_found}, {"recall", l.recall},
                       {"mass", l.mass}, {"gate_cmp", l.gate[0]}, {"gate_slc", l.gate[1]}, {"gate_win", l.gate[2]},
                       {"grad_norm", l.grad_norm}, {"seconds", l.seconds}});
  }
  json j = resolved_config(cmd, vm);
  j["config"] = config_json(s.cfg);
  out.add_text("train.csv", csv.str());
  out.add_text("train.json", json{{"config", config_json(s.cfg)}, {"records", records}}.dump(1) + "\n");
  out.add("gate_w", r.gate_w);
  out.add("gate_b", r.gate_b);
  out.add_text("config.json", j.dump(2) + "\n");
  add_compress_params(phi_out, r.phi, s.cfg.compress);
  phi_out.commit();
  out.commit();
  const auto& first = r.log.front();
  const auto& last = r.log.back();
  std::cout << "train: loss " << first.loss << " -> " << last.loss << ", needle_found " << first.needle_found << " -> "
            << last.needle_found << "; wrote " << out.dir() << "/train.csv, train.json, phi/\n";
  return 0;
}

}  // namespace nsa::cli
