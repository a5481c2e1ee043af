// Single-process prefill and decode speed of a checkpoint, against the machine's
// bounds measured in the same run:
//   decode  tokens/s vs  bandwidth / (weight + cache bytes read per token)   target >= 0.8
//           (bandwidth: the larger of a read far larger than the caches and a read
//           cycling over a buffer of one step's bytes, which the caches partly hold)
//   prefill FLOP/s   vs  the machine's F32 matrix-multiply rate               target >= 0.8
//   batched decode (--batch): B sequences a step; tokens/s vs the larger of the read
//   bound (distinct weight bytes the step touches + the cache rows it reads, over the
//   read bandwidth) and the compute bound (its multiply-adds at the F32 GEMM rate); and,
//   as "phases", against the sum of the dense products' and the routed experts' bounds,
//   each the larger of its own read and compute (the step runs them one after the other).
// With --precision fast the weights are int8 (half the bytes read), prefill is also
// compared with the F32 rate (the targets: >= 3x where AVX512_BF16 or AMX exists,
// 2x with VNNI alone, none with AVX2 alone) and with the int8 kernel's own rate, and batched decode's compute
// bound is the int8 rate.
// Prefill, decode and each batch size also print the time a step spends in each phase
// of the layer schedule (Model::set_phase_times), with the rate each phase reads its
// weights at: where a step falls short of its bound (prefill's over the runs after the
// first, which is printed on its own). Decode and each batch size then set the experts'
// rate against a plain read of the last step's experts, the same bytes in the same
// pieces, right after (bench/bounds.h PlainReadGbs): whether the products or the host's
// reads of such pieces are short of the probe. The machine lines also give what a team
// of threads costs to start and join, which every product pays.
// Make a model with e.g. `epic-mkmodel --preset v2-lite-shape --layers 4 --out DIR`.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/bounds.h"
#include "bench/timing.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul_int8.h"
#include "worker/model.h"

namespace {

using epic::bench::Clock;
using epic::bench::Median;
using epic::bench::Since;


int64_t Bytes(const epic::cpu::WeightMatrix& m) { return m.rows * m.cols * m.ElementBytes(); }
int64_t Params(const epic::cpu::WeightMatrix& m) { return m.rows * m.cols; }

// The read rate of a buffer of STEP_BYTES read again and again, as decode reads its
// weights step after step: where a step's bytes are a few times the last-level cache,
// part of them stay there from one step to the next, and the large buffer's probe alone
// is a bound the model beats (small experts' 91 MB steps on a 32 MiB L3 decoded at
// 1.02-1.08 of a 1 GiB read; a plain read cycling over 96 MB ran up to 1.2x it). Every
// step's bytes counted as read again overstates what stays (the routed experts change
// from step to step): it errs towards a higher bound. Steps of BUFFER_GIB or more are
// left to the large probe (none of them stays in a cache).
double CyclingReadGbs(double step_bytes, double buffer_gib) {
  const double gib = step_bytes / static_cast<double>(1ll << 30);
  return gib < buffer_gib ? epic::bench::MeasureBandwidth(gib, 2).read_gbs : 0.0;
}

// The memory W's values span into REGIONS: for kI8 its panels and its scales, which
// need not lie together.
void AddRegions(const epic::cpu::WeightMatrix& w, std::vector<epic::bench::Region>* regions) {
  if (w.type == epic::cpu::WeightType::kI8) {
    regions->push_back({w.data, epic::cpu::QuantizedPanelBytes(w.rows, w.cols)});
    regions->push_back({w.scales, w.rows * static_cast<int64_t>(sizeof(float))});
  } else {
    regions->push_back({w.data, w.Bytes()});
  }
}

// An MLP's matrices, as its products read them (gate|up stacked where it is).
void AddRegions(const epic::MlpWeights& w, std::vector<epic::bench::Region>* regions) {
  if (w.gate_up.data != nullptr) {
    AddRegions(w.gate_up, regions);
  } else {
    AddRegions(w.gate, regions);
    AddRegions(w.up, regions);
  }
  AddRegions(w.down, regions);
}

// Weight bytes and multiply-adds one token reads and does in one layer, outside
// attention's context-dependent part.
struct PerToken {
  int64_t bytes = 0;
  int64_t macs = 0;
  void Add(const epic::cpu::WeightMatrix& m) {
    bytes += Bytes(m);
    macs += Params(m);
  }
  void Add(const epic::MlpWeights& w) {
    Add(w.gate);
    Add(w.up);
    Add(w.down);
  }
};

// The weight bytes a step reads in each phase of the layer schedule that reads weights:
// every layer's, once a step; EXPERT is one routed expert's (a step reads it once if any
// token chose it).
struct PhaseBytes {
  double attention = 0, output = 0, gate = 0, mlp = 0, lm_head = 0, expert = 0;
};

// Each phase's milliseconds a step over STEPS steps of TIMES, and for those that read
// weights the rate they read them at (the attention's with the cache rows CACHE_BYTES,
// the experts' DISTINCT_EXPERTS a step), then what no phase holds of STEP_S seconds.
void PrintPhases(const epic::PhaseTimes& times, int64_t steps, double step_s, const PhaseBytes& bytes,
                 double cache_bytes, double distinct_experts) {
  using epic::Phase;
  const double per = 1.0 / static_cast<double>(steps);
  const bool rates = bytes.attention + bytes.output + bytes.gate + bytes.mlp + bytes.lm_head + bytes.expert > 0;
  std::printf("  phases, ms a step%s:", rates ? " (GB/s of weights read)" : "");
  double sum = 0;
  for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
    const Phase p = static_cast<Phase>(i);
    const double s = times[p] * per;
    sum += s;
    const double read = p == Phase::kAttention ? bytes.attention + cache_bytes
                        : p == Phase::kOutput  ? bytes.output
                        : p == Phase::kGate    ? bytes.gate
                        : p == Phase::kExperts ? bytes.expert * distinct_experts
                        : p == Phase::kMlp     ? bytes.mlp
                        : p == Phase::kLmHead  ? bytes.lm_head
                                               : 0;
    if (read > 0 && s > 0) {
      std::printf(" %s %.2f (%.1f)", epic::PhaseName(p), s * 1e3, read / s / 1e9);
    } else {
      std::printf(" %s %.2f", epic::PhaseName(p), s * 1e3);
    }
  }
  std::printf(", rest %.2f\n", (step_s - sum) * 1e3);
}

// The experts of the step COUNTS counted read again by a plain loop (PlainReadGbs), a
// layer at a time: what their bytes, in their pieces, allow at this moment; and the
// rate the steps' experts phase read theirs at (DISTINCT experts and EXPERTS_S seconds
// a step), against it. Where the experts fall short of the bandwidth probe, this says
// whether their products or the host's reads of such pieces are short.
void PrintExpertsAgainstPlainRead(const epic::Model& model, const epic::ExpertCounts& counts, double distinct,
                                  double experts_s) {
  std::vector<std::vector<epic::bench::Region>> layers;
  int64_t experts = 0;
  double bytes = 0;
  for (size_t l = 0; l < counts.slot_tokens.size(); ++l) {
    if (counts.slot_tokens[l].empty()) continue;
    layers.emplace_back();
    for (size_t e = 0; e < counts.slot_tokens[l].size(); ++e) {
      if (counts.slot_tokens[l][e] == 0) continue;
      AddRegions(model.weights().layers[l].experts[e], &layers.back());
      ++experts;
    }
    for (const epic::bench::Region& r : layers.back()) bytes += static_cast<double>(r.bytes);
  }
  const double plain_gbs = epic::bench::PlainReadGbs(layers, 3);
  if (experts == 0 || experts_s <= 0 || plain_gbs <= 0) return;
  // The steps' experts at the plain read's bytes an expert (an int8 matrix's panels and
  // scales).
  const double gbs = distinct * (bytes / static_cast<double>(experts)) / experts_s / 1e9;
  std::printf("  experts: %.1f GB/s in the steps; a plain read of the last step's %lld (%.1f MB), a layer at a "
              "time, whole experts a thread: %.1f GB/s; %.2f of it\n",
              gbs, static_cast<long long>(experts), bytes / 1e6, plain_gbs, gbs / plain_gbs);
}

// B sequences of CONTEXT tokens each, then STEPS decode steps of all B together: the
// median step's tokens/s against the step's bound. Every weight outside the routed
// experts is read once a step (STEP_BYTES, STEP_MACS per token); each routed expert at
// least one token chose in the step once (EXPERT_BYTES); each sequence's cache rows once.
epic::Status BatchedDecode(epic::Model& model, const std::vector<int64_t>& batches, int64_t context, int64_t steps,
                   double buffer_gib, double gemm_gflops, int64_t step_bytes, int64_t step_macs, int64_t expert_bytes,
                   int64_t expert_macs, int64_t row_bytes, const PhaseBytes& phase_bytes) {
  const epic::ModelConfig& c = model.config();
  std::printf("batched decode: %lld context tokens a sequence, %lld steps (median); bound: the larger of "
              "read (distinct weights + cache, at the largest of the read bandwidths probed before and after the "
              "steps and of a read cycling over a step's bytes) and compute (the GEMM rate of the products: F32, "
              "int8 under fast)\n",
              static_cast<long long>(context), static_cast<long long>(steps));
  std::printf("%6s %10s %10s %12s %10s %8s %8s %8s\n", "batch", "tok/s", "step ms", "MB read/step", "bound", "ratio",
              "bound by", "phases");
  const int64_t block = 16;
  for (const int64_t b : batches) {
    auto cache = model.MakeCache(block, b * ((context + steps + block - 1) / block));
    std::vector<epic::BlockTable> tables(static_cast<size_t>(b));
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(b));
    std::vector<epic::SequenceStep> batch(static_cast<size_t>(b));
    for (int64_t i = 0; i < b; ++i) {
      EPIC_RETURN_IF_ERROR(cache->Reserve(&tables[i], context + steps));
      for (int64_t t = 0; t < context; ++t) {
        prompts[i].push_back(static_cast<int32_t>((i * 104729 + t * 7919 + 13) % c.vocab_size));
      }
      batch[i] = {&tables[i], prompts[i], false};
    }
    std::vector<float> logits;
    EPIC_RETURN_IF_ERROR(model.Forward(batch, cache.get(), &logits));
    // This host's read bandwidth changes from minute to minute: it is measured before
    // and after the steps, and the larger taken, so that a step cannot beat its bound
    // by running in a faster minute than the probe.
    const double before_gbs = epic::bench::MeasureBandwidth(buffer_gib, 2).read_gbs;
    std::vector<int32_t> next(static_cast<size_t>(b));
    struct Step {
      double seconds, cache_bytes;
      int64_t distinct, routed;
    };
    std::vector<Step> measured;
    epic::ExpertCounts last;  // the last step's experts
    epic::PhaseTimes phases;
    model.set_phase_times(&phases);
    for (int64_t s = 0; s < steps; ++s) {
      double cache_bytes = 0;
      for (int64_t i = 0; i < b; ++i) {
        next[i] = static_cast<int32_t>((i * 31 + s * 17 + 5) % c.vocab_size);
        batch[i].tokens = {&next[i], 1};
        cache_bytes += static_cast<double>(tables[i].num_tokens + 1) * row_bytes * c.num_hidden_layers;
      }
      epic::ExpertCounts counts;
      const auto t0 = Clock::now();
      EPIC_RETURN_IF_ERROR(model.Forward(batch, cache.get(), &logits, &counts));
      Step step{Since(t0), cache_bytes, 0, 0};
      for (const auto& layer : counts.tokens) {
        for (const int64_t n : layer) {
          step.distinct += n > 0;
          step.routed += n;
        }
      }
      measured.push_back(step);
      last = std::move(counts);
    }
    model.set_phase_times(nullptr);
    // What each step reads: the weights outside the routed experts, its distinct experts,
    // the cache rows.
    std::vector<double> step_s, ratios, phase_ratios, bytes_per_step;
    for (const Step& m : measured) {
      bytes_per_step.push_back(static_cast<double>(step_bytes) + static_cast<double>(m.distinct * expert_bytes) +
                               m.cache_bytes);
    }
    const double read_gbs = std::max({before_gbs, epic::bench::MeasureBandwidth(buffer_gib, 2).read_gbs,
                                      CyclingReadGbs(Median(bytes_per_step), buffer_gib)});
    bool compute_bound = false;
    double all_s = 0, all_cache = 0, all_distinct = 0;
    for (size_t i = 0; i < measured.size(); ++i) {
      const Step& m = measured[i];
      all_s += m.seconds;
      all_cache += m.cache_bytes;
      all_distinct += static_cast<double>(m.distinct);
      const double bytes = bytes_per_step[i];
      const double macs = static_cast<double>(b * step_macs + m.routed * expert_macs);
      auto read = [&](double b) { return b / (read_gbs * 1e9); };
      auto compute = [&](double m) { return 2.0 * m / (gemm_gflops * 1e9); };
      const double read_s = read(bytes), compute_s = compute(macs);
      compute_bound = compute_s > read_s;
      // The step runs its dense products (every token through the weights outside the
      // routed experts, plus the cache) and its routed experts one after the other: each
      // phase is bound by its own larger side, and the phases add.
      const double dense_s = std::max(read(static_cast<double>(step_bytes) + m.cache_bytes),
                                      compute(static_cast<double>(b * step_macs)));
      const double experts_s = std::max(read(static_cast<double>(m.distinct * expert_bytes)),
                                        compute(static_cast<double>(m.routed * expert_macs)));
      step_s.push_back(m.seconds);
      ratios.push_back(std::max(read_s, compute_s) / m.seconds);
      phase_ratios.push_back((dense_s + experts_s) / m.seconds);
    }
    const double step = Median(step_s);
    const double ratio = Median(ratios);
    std::printf("%6lld %10.1f %10.2f %12.1f %9.1f/s %8.2f %8s %8.2f\n", static_cast<long long>(b), b / step,
                step * 1e3, Median(bytes_per_step) / 1e6, b / (ratio * step), ratio, compute_bound ? "compute" : "read",
                Median(phase_ratios));
    const double n = static_cast<double>(steps);
    PrintPhases(phases, steps, all_s / n, phase_bytes, all_cache / n, all_distinct / n);
    PrintExpertsAgainstPlainRead(model, last, all_distinct / n, phases[epic::Phase::kExperts] / n);
  }
  return epic::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"model_bench: single-process prefill and decode tokens/s of a checkpoint, with\n"
               "their ratios to the memory-bandwidth and F32 matrix-multiply bounds of this machine."};
  std::string model_dir;
  int64_t prompt_len = 128;
  int64_t decode_steps = 32;
  int repeats = 3;
  int threads = 0;
  double buffer_gib = 1.0;
  bool mapped = false;
  std::vector<int64_t> batches;
  int64_t batch_context = 32;
  int64_t batch_steps = 8;
  app.add_option("--model", model_dir, "checkpoint directory")->required();
  app.add_option("--prompt", prompt_len, "prefill length in tokens")->capture_default_str();
  app.add_option("--decode", decode_steps, "decode steps after the prompt")->capture_default_str();
  app.add_option("--repeats", repeats, "prefill repetitions (median)")->capture_default_str();
  app.add_option("--threads", threads, "threads (0: one per core)");
  app.add_option("--buffer-gib", buffer_gib, "buffer for the bandwidth measurement")->capture_default_str();
  app.add_flag("--mmap", mapped, "weights in place from the file mapping (4 KiB pages)");
  std::string precision_name = "exact";
  app.add_option("--precision", precision_name, epic::cpu::kPrecisionHelp)
      ->check(CLI::IsMember({"exact", "fast"}))->capture_default_str();
  app.add_option("--batch", batches,
                 "batched decode: sequences per step, comma-separated (e.g. 1,4,16,64); each sequence "
                 "prefilled with --batch-context tokens first")
      ->delimiter(',')->check(CLI::PositiveNumber);
  app.add_option("--batch-context", batch_context, "prompt tokens of each batched sequence")->capture_default_str();
  app.add_option("--batch-steps", batch_steps, "decode steps timed per batch size")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) omp_set_num_threads(threads);

  epic::cpu::Precision precision = epic::cpu::Precision::kExact;
  epic::cpu::ParsePrecision(precision_name.c_str(), &precision);
  // The checkpoint first: a wrong path is said at once, not after the probes.
  auto loaded = epic::Model::Load(model_dir, {},
                                  mapped ? epic::WeightResidency::kMapped : epic::WeightResidency::kCopy, {},
                                  epic::ComputeDevice::kCpu, precision);
  if (!loaded.ok()) {
    std::fprintf(stderr, "model_bench: %s\n", loaded.status().ToString().c_str());
    return 1;
  }

  const epic::bench::Bandwidth bw = epic::bench::MeasureBandwidth(buffer_gib, 5);
  epic::bench::GemmRate gemm = epic::bench::MeasureF32GemmRate(5);
  epic::bench::GemmRate int8 =
      precision == epic::cpu::Precision::kFast ? epic::bench::MeasureInt8GemmRate(5) : epic::bench::GemmRate{};
  std::printf("machine: %d threads; read bandwidth %.1f GB/s (%d streams a thread; one stream %.1f GB/s), copy "
              "bandwidth %.1f GB/s (read+write bytes); F32 GEMM %.1f GFLOP/s (%s)\n",
              omp_get_max_threads(), bw.read_gbs, bw.read_streams, bw.one_stream_gbs, bw.copy_gbs, gemm.gflops,
              gemm.how.c_str());
  if (int8.gflops > 0) std::printf("machine: int8 GEMM %.1f GOP/s (%s)\n", int8.gflops, int8.how.c_str());
  // Each product's team starts and joins once: a decode step of small matrices pays it
  // about ten times a layer.
  const epic::bench::TeamCost team = epic::bench::MeasureTeamCost();
  std::printf("machine: threads started and joined: the kernels' team %.2f us, an OpenMP region %.2f us; a handoff "
              "between two spinning threads and back %.2f us\n",
              team.team_us, team.region_us, team.handoff_us);

  epic::Model& model = **loaded;
  const epic::ModelConfig& c = model.config();
  const epic::ModelWeights& w = model.weights();
  std::printf("model: %s; %.2f GiB of matrices; products %s\n", c.Summary().c_str(), w.matrix_bytes / 1073741824.0,
              epic::cpu::PrecisionName(model.precision()));
  const bool fast = model.precision() == epic::cpu::Precision::kFast;

  // What one token reads and computes, context aside; and what a step reads whatever
  // its batch (every weight but the routed experts'), and one routed expert's bytes.
  // Each phase's share of those bytes as well (PrintPhases).
  PerToken per_token, shared_by_step;
  PhaseBytes phase_bytes;
  int64_t expert_bytes = 0, expert_macs = 0, moe_layers = 0;
  for (const epic::LayerWeights& L : w.layers) {
    const int64_t before = per_token.bytes;
    if (c.q_lora_rank > 0) {
      per_token.Add(L.q_a_proj);
      per_token.Add(L.q_b_proj);
    } else {
      per_token.Add(L.q_proj);
    }
    per_token.Add(L.kv_a_proj);
    per_token.Add(L.kv_b_proj);  // decode reads all of it (W_UK and W_UV)
    phase_bytes.attention += static_cast<double>(per_token.bytes - before);
    per_token.Add(L.o_proj);
    phase_bytes.output += static_cast<double>(Bytes(L.o_proj));
    const epic::MlpWeights* mlp = !L.moe ? &L.dense : L.has_shared ? &L.shared : nullptr;
    if (mlp != nullptr) {
      const int64_t at = per_token.bytes;
      per_token.Add(*mlp);
      phase_bytes.mlp += static_cast<double>(per_token.bytes - at);
    }
    if (!L.moe) continue;
    ++moe_layers;
    per_token.Add(L.router);
    phase_bytes.gate += static_cast<double>(Bytes(L.router));
    for (int64_t e = 0; e < c.num_experts_per_tok; ++e) per_token.Add(L.experts[0]);  // all experts alike
    PerToken one;
    one.Add(L.experts[0]);
    expert_bytes = one.bytes;
    expert_macs = one.macs;
  }
  shared_by_step = per_token;
  for (const epic::LayerWeights& L : w.layers) {
    if (!L.moe) continue;
    shared_by_step.bytes -= c.num_experts_per_tok * expert_bytes;
    shared_by_step.macs -= c.num_experts_per_tok * expert_macs;
  }
  const int64_t lm_head_bytes = Bytes(w.lm_head);
  phase_bytes.lm_head = static_cast<double>(lm_head_bytes);
  phase_bytes.expert = static_cast<double>(expert_bytes);

  std::vector<int32_t> prompt(static_cast<size_t>(prompt_len));
  for (int64_t i = 0; i < prompt_len; ++i) prompt[i] = static_cast<int32_t>((i * 7919 + 13) % c.vocab_size);
  const int64_t block = 16;
  const int64_t total = prompt_len + decode_steps;
  auto cache = model.MakeCache(block, (total + block - 1) / block);
  const int64_t row_bytes = cache->row_bytes();
  std::vector<float> logits;

  // Prefill: median of REPEATS fresh runs.
  std::vector<double> prefill_s;
  epic::BlockTable table;
  epic::PhaseTimes prefill_phases;
  for (int r = 0; r < repeats; ++r) {
    cache->Release(&table);
    if (!cache->Reserve(&table, total).ok()) return 1;
    epic::SequenceStep step{&table, prompt, false};
    const auto t0 = Clock::now();
    // The phases of the runs after the first, which pays the process's first touches
    // (printed on its own below).
    model.set_phase_times(r > 0 || repeats == 1 ? &prefill_phases : nullptr);
    const epic::Status s = model.Forward({&step, 1}, cache.get(), &logits);
    model.set_phase_times(nullptr);
    prefill_s.push_back(Since(t0));
    if (!s.ok()) {
      std::fprintf(stderr, "model_bench: %s\n", s.ToString().c_str());
      return 1;
    }
  }
  const double prefill = Median(prefill_s);
  // The host's compute rate drifts as its bandwidth does (its F32 GEMM moved 165-223
  // GFLOP/s between runs on Zen 4, its int8 one 700-1396 on Zen 5): the rates are probed
  // again after the prefills and the larger taken, so that prefill cannot beat its bound
  // by running in a faster minute than the first probe.
  const epic::bench::GemmRate gemm_after = epic::bench::MeasureF32GemmRate(5);
  const epic::bench::GemmRate int8_after = fast ? epic::bench::MeasureInt8GemmRate(5) : epic::bench::GemmRate{};
  const double gemm_before = gemm.gflops, int8_before = int8.gflops;
  if (gemm_after.gflops > gemm.gflops) gemm = gemm_after;
  if (int8_after.gflops > int8.gflops) int8 = int8_after;
  // Multiply-adds of the prefill: every token through every matrix, attention's
  // expansion of the context through kv_b_proj counted once per token, causal scores
  // and values, and lm_head for the last token only.
  const double heads = static_cast<double>(c.num_attention_heads);
  double attention_macs = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    attention_macs += 0.5 * prompt_len * (prompt_len + 1) * heads * (c.q_head_dim() + c.v_head_dim);
  }
  const double prefill_flops =
      2.0 * (static_cast<double>(per_token.macs) * prompt_len + attention_macs + Params(w.lm_head));
  const double prefill_gflops = prefill_flops / prefill / 1e9;
  std::printf("prefill: %lld tokens in %.3f s (median of %d) = %.1f tok/s, %.1f GFLOP/s; "
              "ratio to F32 GEMM %.2f (the larger of %.1f and %.1f GFLOP/s probed before and after; target >= %s)",
              static_cast<long long>(prompt_len), prefill, repeats, prompt_len / prefill, prefill_gflops,
              prefill_gflops / gemm.gflops, gemm_before, gemm_after.gflops,
              // The fast targets: 3x where AMX or AVX512_BF16 exists, 2x with VNNI alone.
              !fast                                                 ? "0.8"
              : epic::cpu::Has(epic::cpu::Isa::kAvx512Bf16)         ? "3 on a host with BF16"
              : epic::cpu::internal::ActiveInt8Path() != epic::cpu::internal::Int8Path::kAvx2 ? "2 with VNNI"
                                                                    : "none set without VNNI");
  if (fast) std::printf("; to the int8 GEMM %.2f (the larger of %.1f and %.1f GOP/s)", prefill_gflops / int8.gflops,
                        int8_before, int8_after.gflops);
  std::printf("\n");
  // A server's first request pays what the process does the first time (its scratch
  // buffers' first touch above all).
  if (repeats > 1) {
    std::printf("  the process's first prefill: %.3f s, %.2fx the median\n", prefill_s[0], prefill_s[0] / prefill);
  }
  {
    const int timed = repeats > 1 ? repeats - 1 : 1;
    double sum_s = 0;
    for (int r = repeats - timed; r < repeats; ++r) sum_s += prefill_s[static_cast<size_t>(r)];
    // Prefill is bound by its products, not its reads: times alone.
    PrintPhases(prefill_phases, timed, sum_s / timed, PhaseBytes{}, 0, 0);
  }

  // Decode: one token per step after the last prefill, context prompt_len .. total-1.
  // This host's bandwidth drifts from minute to minute, so each round measures it
  // just before its decode steps, and the ratio is taken round by round.
  // Four rounds, or one per step when there are fewer (each round needs a step).
  const int rounds = static_cast<int>(std::min<int64_t>(4, decode_steps));
  std::vector<double> round_tps, round_bw, round_ratio;
  double bytes_sum = 0, decode_s = 0, cache_sum = 0;
  epic::PhaseTimes decode_phases;
  epic::ExpertCounts decode_counts;  // the last step's experts
  int32_t token = 1;
  for (int r = 0; r < rounds; ++r) {
    const double before_gbs = epic::bench::MeasureBandwidth(buffer_gib, 2).read_gbs;
    const int64_t steps = decode_steps * (r + 1) / rounds - decode_steps * r / rounds;
    std::vector<double> step_s;
    double round_bytes = 0;
    for (int64_t i = 0; i < steps; ++i) {
      epic::SequenceStep step{&table, {&token, 1}, false};
      const int64_t context = table.num_tokens + 1;
      // The last step's experts counted (and only its: Forward adds to COUNTS).
      const bool last = r + 1 == rounds && i + 1 == steps;
      const auto t0 = Clock::now();
      model.set_phase_times(&decode_phases);
      const epic::Status s = model.Forward({&step, 1}, cache.get(), &logits, last ? &decode_counts : nullptr);
      model.set_phase_times(nullptr);
      step_s.push_back(Since(t0));
      decode_s += step_s.back();
      cache_sum += static_cast<double>(context) * row_bytes * c.num_hidden_layers;
      if (!s.ok()) {
        std::fprintf(stderr, "model_bench: %s\n", s.ToString().c_str());
        return 1;
      }
      round_bytes += static_cast<double>(per_token.bytes + lm_head_bytes) +
                     static_cast<double>(context) * row_bytes * c.num_hidden_layers;
      token = static_cast<int32_t>((token * 31 + 7) % c.vocab_size);
    }
    bytes_sum += round_bytes;
    // Decode only reads its weights and cache: the bound is the streaming read rate, the
    // larger of the probes before and after the round (see BatchedDecode), and of a read
    // cycling over a step's bytes.
    const double gbs = std::max({before_gbs, epic::bench::MeasureBandwidth(buffer_gib, 2).read_gbs,
                                 CyclingReadGbs(round_bytes / static_cast<double>(steps), buffer_gib)});
    const double tps = 1.0 / Median(step_s);
    round_tps.push_back(tps);
    round_bw.push_back(gbs);
    round_ratio.push_back(tps / (gbs * 1e9 / (round_bytes / static_cast<double>(steps))));
  }
  if (rounds > 0) {
    const double bytes_per_token = bytes_sum / static_cast<double>(decode_steps);
    const double tps = Median(round_tps);
    const double gbs = Median(round_bw);
    std::printf("decode: %.2f tok/s (median step, context %lld..%lld); %.1f MB read per token; "
                "bound %.2f tok/s at %.1f GB/s read bandwidth (medians of %d rounds, bandwidth the largest of "
                "probes before and after each and of a read cycling over a step's bytes); "
                "ratio %.2f (median of rounds: %.2f..%.2f; target >= 0.8)\n",
                tps, static_cast<long long>(prompt_len + 1), static_cast<long long>(total),
                bytes_per_token / 1e6, gbs * 1e9 / bytes_per_token, gbs, rounds, Median(round_ratio),
                *std::min_element(round_ratio.begin(), round_ratio.end()),
                *std::max_element(round_ratio.begin(), round_ratio.end()));
    const double n = static_cast<double>(decode_steps);
    PrintPhases(decode_phases, decode_steps, decode_s / n, phase_bytes, cache_sum / n,
                static_cast<double>(moe_layers * c.num_experts_per_tok));
    PrintExpertsAgainstPlainRead(model, decode_counts, static_cast<double>(moe_layers * c.num_experts_per_tok),
                                 decode_phases[epic::Phase::kExperts] / n);
  }
  if (!batches.empty()) {
    const epic::Status s =
        BatchedDecode(model, batches, batch_context, batch_steps, buffer_gib, fast ? int8.gflops : gemm.gflops,
                      shared_by_step.bytes + lm_head_bytes, shared_by_step.macs + Params(w.lm_head), expert_bytes,
                      expert_macs, row_bytes, phase_bytes);
    if (!s.ok()) {
      std::fprintf(stderr, "model_bench: %s\n", s.ToString().c_str());
      return 1;
    }
  }
  return 0;
}
