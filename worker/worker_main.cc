// epic-worker: one rank of a worker job, started by mpirun. Every rank loads its share
// of the model; rank 0 attaches to the coordinator and every rank runs its steps.
#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include <CLI/CLI.hpp>

#include "common/text_file.h"
#include "worker/device.h"
#include "worker/job.h"
#include "worker/model.h"
#include "worker/progress.h"
#include "worker/serve.h"

int main(int argc, char** argv) {
  CLI::App app{"epic-worker: one rank of an epic worker job. Start it under mpirun, one rank per GPU\n"
               "or CPU process: `mpirun -np N epic-worker --model DIR --coordinator HOST:PORT`.\n"
               "Each rank loads its share of the model (its experts, and heads, vocabulary rows and MLP\n"
               "columns under --attention tp); rank 0\n"
               "attaches to the coordinator and the job runs the steps it sends. The job exits 0 when the\n"
               "coordinator stops, and with code 3 when its link closes otherwise (launch/cluster.sh\n"
               "relaunches it then). Exit code 4:\n"
               "the coordinator refused the job (wrong secret, or a model it cannot serve): a relaunch\n"
               "cannot help."};
  std::string model_dir;
  epic::WorkerOptions options;
  std::string secret_file;
  std::string device = "cpu";
  std::string attention = "tp";
  std::string precision = "exact";
  int threads = 0;
  bool mapped = false;
  int connect_timeout = 60;
  app.add_option("--model", model_dir, "checkpoint directory (config.json + *.safetensors)")->required();
  app.add_option("--coordinator", options.coordinator, "the coordinator's address, HOST:PORT")->required();
  app.add_option("--secret-file", secret_file,
                 "file holding the secret shared with the coordinator (default: $EPIC_WORKER_SECRET)");
  app.add_option("--tls-ca", options.tls_ca, "PEM file of the CA that signed the coordinator's TLS certificate "
                                             "(default: plaintext)");
  app.add_option("--connect-timeout", connect_timeout, "seconds to wait for the coordinator")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--precision", precision, epic::cpu::kPrecisionHelp)
      ->check(CLI::IsMember({"exact", "fast"}))->capture_default_str();
  app.add_option("--device", device,
                 "compute device: cpu, or cuda (each rank on its own GPU, the ranks of a host on GPUs 0, 1, ...)")
      ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  app.add_option("--attention", attention,
                 "how the ranks share attention: tp splits every sequence's heads, vocabulary and dense MLPs "
                 "over the ranks (at most as many ranks as heads; every rank holds the same latent cache); dp "
                 "gives each sequence to one rank, which holds all of attention and that sequence's cache "
                 "(any number of ranks; the cluster holds as many times the context as it has ranks)")
      ->check(CLI::IsMember({"tp", "dp"}))->capture_default_str();
  app.add_option("--threads", threads, "CPU threads per rank (0: OpenMP's default)")->check(CLI::NonNegativeNumber);
  app.add_flag("--mmap", mapped, "use the weights in place from the file mapping (see epic-run --help)");
  CLI11_PARSE(app, argc, argv);
  options.connect_timeout = std::chrono::seconds(connect_timeout);

  auto job = epic::Job::Join(&argc, &argv);
  if (!job.ok()) {
    std::fprintf(stderr, "epic-worker: %s\n", job.status().ToString().c_str());
    return 2;
  }
  const int rank = (*job)->rank();
  const std::string who = "epic-worker: rank " + std::to_string(rank) + ": ";
  auto fail = [&](const std::string& message, int code) {
    std::fprintf(stderr, "%s%s\n", who.c_str(), message.c_str());
    (*job)->Abort(code);
  };
  if (!secret_file.empty()) {
    auto secret = epic::ReadSecretFile(secret_file);
    if (!secret.ok()) fail("--secret-file " + secret.status().message(), 2);
    options.secret = std::move(secret).value();
  } else if (const char* env = std::getenv("EPIC_WORKER_SECRET")) {
    options.secret = env;
  }
  if (options.secret.empty()) fail("no worker secret: pass --secret-file FILE or set EPIC_WORKER_SECRET", 2);
  const auto compute = epic::ResolveDevice(device);
  if (!compute.ok()) fail(compute.status().message(), 2);
  if (threads > 0) omp_set_num_threads(threads);

  epic::ModelShard shard{(*job)->comm(), nullptr};
  shard.attention = *epic::ParseAttentionMode(attention);
  if (*compute == epic::ComputeDevice::kCuda && (*job)->size() > 1) {
    // Device buffers cross between the ranks' GPUs over NCCL.
    auto device_comm = (*job)->DeviceComm();
    if (!device_comm.ok()) {
    fail(device_comm.status().ToString(), 2);
    }
    shard.device_comm = *device_comm;
  }
  epic::cpu::Precision asked = epic::cpu::Precision::kExact;
  epic::cpu::ParsePrecision(precision.c_str(), &asked);
  epic::ProgressLine progress("loading " + model_dir);
  auto model = epic::Model::Load(
      model_dir, [&](int64_t d, int64_t t) { if (rank == 0) progress.Update(d, t); },
      mapped ? epic::WeightResidency::kMapped : epic::WeightResidency::kCopy, shard, *compute, asked);
  progress.Finish();
  if (!model.ok()) fail(model.status().ToString(), 1);
  std::fprintf(stderr, "%sholds %.1f MiB of weights, products %s\n", who.c_str(),
               (*model)->weights().matrix_bytes / 1048576.0, epic::PrecisionNote(**model, asked).c_str());

  const epic::Status s = epic::ServeCoordinator(**model, options, device);
  // How the job ends, the same on every rank: the coordinator stopped and said so (0); the
  // link closed otherwise, which the launcher answers by relaunching (3); the coordinator
  // refused the job, which a relaunch cannot help (4). Anything else may leave ranks
  // mid-collective: the job is aborted.
  int code;
  switch (s.code()) {
    case epic::StatusCode::kCancelled: code = 0; break;
    case epic::StatusCode::kUnavailable: code = 3; break;
    case epic::StatusCode::kUnauthenticated:
    case epic::StatusCode::kInvalidArgument: code = 4; break;
    default: fail(s.ToString(), 1); return 1;
  }
  if (rank == 0) std::fprintf(stderr, "%s%s; exiting\n", who.c_str(), s.message().c_str());
  return code;
}
