// The worker job the coordinator targets serve against: a fixed, valid Hello (4 layers,
// MoE from layer 1, 8 experts in 2 groups over 2 ranks, the small tokenizer's
// vocabulary, a context of 256), the coordinator's text codec over the small tokenizer,
// and a fabricated worker that answers a step as a real one would.
#pragma once

#include <memory>

#include <google/protobuf/stubs/logging.h>

#include "coordinator/generation.h"
#include "coordinator/scheduler.h"
#include "coordinator/worker_session.h"
#include "fuzz/fuzz_support.h"
#include "worker_link.pb.h"

namespace epic::fuzz {

// Protobuf logs every string field of invalid UTF-8 it refuses to parse; the targets
// parse millions of such inputs. Call first in a protobuf target.
inline void QuietProtobuf() {
  static const bool quiet = [] {
    google::protobuf::SetLogHandler(nullptr);
    return true;
  }();
  (void)quiet;
}

inline const v1::internal::Hello& JobHello() {
  static const v1::internal::Hello* hello = [] {
    auto* h = new v1::internal::Hello();
    v1::ModelSummary* m = h->mutable_model();
    m->set_model_type("deepseek_v3");
    m->set_vocab_size(kSmallVocab);
    m->set_num_hidden_layers(4);
    m->set_n_routed_experts(8);
    m->set_num_experts_per_tok(2);
    m->set_n_group(2);
    m->set_topk_group(1);
    m->set_max_position_embeddings(256);
    m->add_eos_token_ids(1);
    m->set_first_k_dense_replace(1);
    for (int r = 0; r < 2; ++r) h->add_ranks()->set_rank(r);
    for (int layer = 1; layer < 4; ++layer) {
      v1::LayerPlacement* lp = h->add_placement();
      lp->set_layer(layer);
      for (int r = 0; r < 2; ++r) {
        v1::RankSlots* slots = lp->add_ranks();
        for (int e = 0; e < 4; ++e) slots->add_experts(4 * r + e);
      }
    }
    EPIC_FUZZ_CHECK(coordinator::ValidateHello(*h).ok());
    return h;
  }();
  return *hello;
}

// The scheduler options of the targets: 64 blocks of 4 tokens, 32 tokens a step.
inline coordinator::SchedulerOptions JobSchedulerOptions() {
  coordinator::SchedulerOptions options;
  options.block_size = 4;
  options.num_blocks = 64;
  options.max_step_tokens = 32;
  return options;
}

// The coordinator's tokenizer and chat template (epic-mkmodel's) over the small tokenizer.
inline std::shared_ptr<const coordinator::TextCodec> JobText() {
  static const auto* text = [] {
    auto codec = coordinator::TextCodec::Load(SmallTokenizerDir().string());
    EPIC_FUZZ_CHECK(codec.ok());
    return new std::shared_ptr<const coordinator::TextCodec>(*codec);
  }();
  return *text;
}

// What the worker checks of each sequence before it runs a step (worker/serve.cc, and
// token ids in model.cc): a step the scheduler builds must pass, or the job would fail on
// it. Token ids are the prompt's (validated) and what the worker sampled; CHECK_TOKENS is
// false where a fuzzed worker sampled them.
inline void CheckStep(const v1::internal::Step& step, const coordinator::SchedulerOptions& options,
                      bool check_tokens = true) {
  const v1::ModelSummary& m = JobHello().model();
  for (const v1::internal::SequenceWork& w : step.sequences()) {
    EPIC_FUZZ_CHECK(w.token_ids_size() > 0);
    EPIC_FUZZ_CHECK(w.position() >= 0 && w.position() + w.token_ids_size() <= m.max_position_embeddings());
    for (const int32_t id : w.token_ids()) EPIC_FUZZ_CHECK(!check_tokens || (id >= 0 && id < m.vocab_size()));
    EPIC_FUZZ_CHECK((w.position() + w.token_ids_size() + options.block_size - 1) / options.block_size <= w.blocks_size());
    for (const int32_t b : w.blocks()) EPIC_FUZZ_CHECK(b >= 0 && b < options.num_blocks);
  }
}

// A worker's answer to STEP: a token for every sequence that samples, never the EOS id
// (1) unless SALT says so, so that generations mostly run to their length.
inline v1::internal::StepResult AnswerStep(const v1::internal::Step& step, uint32_t salt = 0) {
  v1::internal::StepResult result;
  result.set_step_id(step.step_id());
  for (const v1::internal::SequenceWork& w : step.sequences()) {
    if (!w.sample()) continue;
    v1::internal::Sampled* s = result.add_sampled();
    s->set_sequence_id(w.sequence_id());
    const uint32_t pick = static_cast<uint32_t>(w.sequence_id() * 31 + w.draw() * 17 + salt);
    s->set_token_id(static_cast<int32_t>(2 + pick % (kSmallVocab - 2)));
    if (salt != 0 && pick % 23 == 0) s->set_token_id(1);
    s->set_logprob(-0.25f);
  }
  return result;
}

}  // namespace epic::fuzz
