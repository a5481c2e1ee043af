#include "parallel/communicator.h"

#include <vector>

namespace epic::parallel {

// Two exchanges, for communicators without a single-call form.
Status Communicator::AllToAllRowsWithTail(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                                          std::span<const int64_t> send_rows, void* recv,
                                          std::span<const int64_t> recv_rows, const void* tail,
                                          int64_t tail_bytes, void* tail_recv) {
  EPIC_RETURN_IF_ERROR(AllToAllRows(x, row_bytes, rows, send_rows, recv, recv_rows));
  std::vector<int64_t> send_tail(send_rows.size()), recv_tail(recv_rows.size());
  for (size_t r = 0; r < send_rows.size(); ++r) send_tail[r] = send_rows[r] * tail_bytes;
  for (size_t r = 0; r < recv_rows.size(); ++r) recv_tail[r] = recv_rows[r] * tail_bytes;
  return AllToAllV(tail, send_tail, tail_recv, recv_tail);
}

}  // namespace epic::parallel
