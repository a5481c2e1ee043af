// What the CUDA kernel tests share: the skip without a GPU and Status assertions.
#pragma once

#include <utility>

#include <gtest/gtest.h>

#include "common/status.h"
#include "kernels/cuda/device.h"

// Every device test starts here: without a GPU it reports SKIPPED, never passed.
#define SKIP_WITHOUT_GPU()                                                                         \
  do {                                                                                             \
    const ::epic::StatusOr<int> devices = ::epic::cuda::DeviceCount();                             \
    if (!devices.ok()) GTEST_SKIP() << "no CUDA device: " << devices.status().ToString();         \
  } while (0)

// Unwraps a StatusOr in a test, failing it with the status otherwise.
#define ASSERT_OK_AND_ASSIGN(lhs, expr)                                                       \
  auto EPIC_STATUS_CONCAT(result_, __LINE__) = (expr);                                        \
  ASSERT_TRUE(EPIC_STATUS_CONCAT(result_, __LINE__).ok())                                     \
      << EPIC_STATUS_CONCAT(result_, __LINE__).status().ToString();                           \
  lhs = std::move(EPIC_STATUS_CONCAT(result_, __LINE__)).value()

#define ASSERT_OK(expr)                                       \
  do {                                                        \
    const ::epic::Status status_ = (expr);                    \
    ASSERT_TRUE(status_.ok()) << status_.ToString();          \
  } while (0)
