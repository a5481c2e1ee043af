// What the coordinator's gRPC services share: statuses in gRPC's terms, secrets compared
// in constant time, and its log lines.
#pragma once

#include <string>

#include <grpcpp/grpcpp.h>

#include "common/status.h"

namespace epic::coordinator {

// S as the gRPC status with the same code and message.
grpc::Status ToGrpc(const Status& s);

// Equal strings, in time that does not depend on where they differ.
bool SecretsMatch(const std::string& a, const std::string& b);

// "epic-coordinator: LINE" on stderr, as one write.
void Log(const std::string& line);

}  // namespace epic::coordinator
