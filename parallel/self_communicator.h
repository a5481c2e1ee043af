// The communicator of a job of one rank: every collective is a copy. What a single
// process runs with, so that it takes the same code path as a distributed job.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace epic::parallel {

std::unique_ptr<Communicator> MakeSelfCommunicator();

}  // namespace epic::parallel
