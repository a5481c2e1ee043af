// A random checkpoint shared by the ranks of an mpirun test job: rank 0 writes it, every
// rank gets its path, and it is removed when the object goes away (every rank together).
#pragma once

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "parallel/communicator.h"
#include "worker/random_checkpoint.h"

namespace epic::testing {

class JobCheckpoint {
 public:
  // PRESET with OVERRIDES applied, random weights from SEED. Every rank calls this.
  JobCheckpoint(parallel::Communicator& comm, const std::string& preset, const nlohmann::json& overrides = {},
                uint64_t seed = 11)
      : comm_(comm) {
    static int counter = 0;
    char path[256] = {};
    if (comm_.rank() == 0) {
      std::snprintf(path, sizeof path, "%s/epic-job-%d-%d", ::testing::TempDir().c_str(), ::getpid(), counter++);
      auto config = PresetConfig(preset);
      EXPECT_TRUE(config.ok()) << config.status().ToString();
      if (config.ok()) {
        if (!overrides.is_null()) config->update(overrides);
        RandomCheckpointOptions o;
        o.seed = seed;
        const Status s = WriteRandomCheckpoint(*config, path, o);
        EXPECT_TRUE(s.ok()) << s.ToString();
      }
    }
    EXPECT_TRUE(comm_.Broadcast(path, sizeof path, 0).ok());
    path_ = path;
  }
  ~JobCheckpoint() {
    (void)comm_.Barrier();  // nobody reads it any more
    std::error_code ec;
    if (comm_.rank() == 0) std::filesystem::remove_all(path_, ec);
  }
  JobCheckpoint(const JobCheckpoint&) = delete;
  JobCheckpoint& operator=(const JobCheckpoint&) = delete;

  const std::filesystem::path& path() const { return path_; }

 private:
  parallel::Communicator& comm_;
  std::filesystem::path path_;
};

}  // namespace epic::testing
