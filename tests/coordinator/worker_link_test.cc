// The coordinator's worker link against peers that misbehave, as a real epic-coordinator
// process on 127.0.0.1: a hello with impossible sizes is refused without wedging the
// link (the next good job attaches), and a peer that never says hello is let go.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "tests/testing/process.h"
#include "worker_link.grpc.pb.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::JsonPort;
using testing::Process;
using testing::ReadAll;

class WorkerLinkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("epic-worker-link-" + std::to_string(getpid()));
    fs::create_directories(dir_);
    std::ofstream(dir_ / "secret") << "s3cret\n";
    coordinator_ = std::make_unique<Process>(
        std::vector<std::string>{EPIC_COORDINATOR_BINARY, "--listen", "127.0.0.1:0", "--http-listen", "off",
                                 "--metrics-listen", "off", "--worker-secret-file", (dir_ / "secret").string(),
                                 "--hello-timeout", "1", "--ready-file", (dir_ / "ready.json").string()},
        dir_ / "coordinator.log");
    for (int i = 0; i < 100 && !fs::exists(dir_ / "ready.json"); ++i) std::this_thread::sleep_for(100ms);
    port_ = JsonPort(ReadAll(dir_ / "ready.json"), "port");
    ASSERT_GT(port_, 0);
    stub_ = v1::internal::WorkerLink::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (HasFailure()) std::fprintf(stderr, "%s\n", ReadAll(dir_ / "coordinator.log").c_str());
    coordinator_.reset();
    fs::remove_all(dir_);
  }

  // A hello for a one-layer model on one rank, with the right secret.
  static v1::internal::Hello GoodHello() {
    v1::internal::Hello h;
    h.set_secret("s3cret");
    h.mutable_model()->set_model_type("deepseek_v2");
    h.mutable_model()->set_vocab_size(64);
    h.mutable_model()->set_num_hidden_layers(1);
    h.mutable_model()->set_max_position_embeddings(128);
    h.add_ranks()->set_rank(0);
    return h;
  }

  // Sends HELLO; returns the status the coordinator ends the link with, or OK once it
  // answered with its welcome (the link is then closed from here).
  grpc::Status Attach(const v1::internal::Hello& hello) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 10s);
    auto stream = stub_->Attach(&ctx);
    v1::internal::WorkerMessage m;
    *m.mutable_hello() = hello;
    stream->Write(m);
    v1::internal::CoordinatorMessage answer;
    if (stream->Read(&answer) && answer.has_welcome()) {
      ctx.TryCancel();
      stream->Finish();
      return grpc::Status::OK;
    }
    return stream->Finish();
  }

  fs::path dir_;
  std::unique_ptr<Process> coordinator_;
  int port_ = 0;
  std::unique_ptr<v1::internal::WorkerLink::Stub> stub_;
};

TEST_F(WorkerLinkTest, ImpossibleHellosAreRefusedAndTheNextGoodJobAttaches) {
  struct Case {
    const char* what;
    std::function<void(v1::internal::Hello*)> edit;
    const char* mention;
  };
  const std::vector<Case> cases = {
      {"negative layers", [](v1::internal::Hello* h) { h->mutable_model()->set_num_hidden_layers(-1); }, "num_hidden_layers"},
      {"huge experts", [](v1::internal::Hello* h) { h->mutable_model()->set_n_routed_experts(int64_t{1} << 40); }, "n_routed_experts"},
      {"no ranks", [](v1::internal::Hello* h) { h->clear_ranks(); }, "ranks"},
      {"placement past the layers",
       [](v1::internal::Hello* h) {
         auto* lp = h->add_placement();
         lp->set_layer(7);
         lp->add_ranks();
       },
       "layer 7"},
      {"more data-parallel caches than the coordinator keeps",
       [](v1::internal::Hello* h) {
         h->set_attention("dp");
         for (int r = 1; r < 8192; ++r) h->add_ranks()->set_rank(r);  // x 1024 blocks each
       },
       "more cache blocks than the coordinator keeps"},
      {"an unknown attention mode", [](v1::internal::Hello* h) { h->set_attention("sp"); }, "attention 'sp'"},
      {"eos past the vocabulary", [](v1::internal::Hello* h) { h->mutable_model()->add_eos_token_ids(999); }, "eos"},
      // Found by fuzz/worker_hello.cc (fuzz/corpus/worker_hello/timeout_unplaced_experts): 4
      // of 40440 experts placed kept the planner of every load report busy for seconds.
      {"an expert on no rank",
       [](v1::internal::Hello* h) {
         h->mutable_model()->set_n_routed_experts(4);
         auto* lp = h->add_placement();
         lp->set_layer(0);
         auto* rank = lp->add_ranks();
         for (const int32_t e : {0, 1, 2}) rank->add_experts(e);
       },
       "expert 3 is on no rank"},
      {"an expert twice on a rank",
       [](v1::internal::Hello* h) {
         h->mutable_model()->set_n_routed_experts(4);
         auto* lp = h->add_placement();
         lp->set_layer(0);
         auto* rank = lp->add_ranks();
         for (const int32_t e : {0, 1, 2, 3, 1}) rank->add_experts(e);
       },
       "holds expert 1 twice"},
  };
  for (const Case& c : cases) {
    v1::internal::Hello hello = GoodHello();
    c.edit(&hello);
    const grpc::Status s = Attach(hello);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.mention), std::string::npos) << c.what << ": " << s.error_message();
  }
  // Nothing was marked attached: a good job attaches now.
  EXPECT_TRUE(Attach(GoodHello()).ok());
}

TEST_F(WorkerLinkTest, APeerThatNeverSaysHelloIsLetGo) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 30s);
  auto stream = stub_->Attach(&ctx);
  const auto start = std::chrono::steady_clock::now();
  v1::internal::CoordinatorMessage answer;
  EXPECT_FALSE(stream->Read(&answer));  // the coordinator ends the silent link
  const grpc::Status s = stream->Finish();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_FALSE(s.ok());
  EXPECT_LT(waited, 10.0) << "--hello-timeout 1 held the link " << waited << " s";
}

}  // namespace
}  // namespace epic
