#pragma once
// Checking that the ranks agree: small collectives over host strings, for the checks that turn a
// rank-to-rank difference (a stale config file on one node, a truncated data file) into one clear
// error on every rank instead of a hang or silently wrong numbers.

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/comm/communicator.hpp"

namespace lockstep::comm {

// 64-bit FNV-1a: stable across builds and processes, unlike std::hash.
std::uint64_t fingerprint(const std::string& text, std::uint64_t seed = 0xcbf29ce484222325ull);

// "rank 1", "ranks 0, 2": for messages.
std::string rank_list(const std::vector<int>& ranks);

// Collective: every rank's string, indexed by rank (two all-gathers).
std::vector<std::string> allgather_strings(Communicator& comm, const std::string& text);

// Collective: every rank's string on `root` (indexed by rank), an empty vector elsewhere. One
// broadcast per rank, so a rank other than root holds one rank's string at a time, not all of them
// (for large per-rank state: PowerSGD's residuals in checkpoints).
std::vector<std::string> gather_strings(Communicator& comm, const std::string& text, int root = 0);

// Collective: runs `work` on rank `root` alone (a file only that rank writes: a checkpoint,
// metrics.jsonl). Should it throw, every rank raises the same lockstep::Error, "<context>: <what>
// (on rank <root>)", instead of the others going on into collectives that rank never joins and
// failing there, much later, with an error that names a collective. Costs one broadcast of an int64
// when `work` succeeds, and one of the message when it does not. The other ranks wait for `work` with
// the communicator's timeout (LOCKSTEP_TIMEOUT_S): past it they raise a TimeoutError naming `context`
// and root (a checkpoint larger than the disk writes in that time needs a longer timeout).
void run_on_root(Communicator& comm, int root, const std::function<void()>& work, const std::string& context);

// Collective: runs `work` on every rank, then shares whether it failed anywhere (for work that can
// fail on one rank alone: a file missing on one node, a device or precision one host lacks). A rank
// whose `work` threw rethrows its own exception; every other rank raises, when some rank failed,
// "<context>: <that rank's message> (on rank <r>; this is rank <me>)". Without this the ranks that
// succeeded would go on into collectives the failed one never joins. Costs two small all-gathers.
void run_on_every_rank(Communicator& comm, const std::function<void()>& work, const std::string& context);

// Collective: checks that every rank holds the same (key, value) entries. Costs one all-gather of a
// 64-bit fingerprint when they agree. When they do not, every rank raises the same lockstep::Error:
//   "<context>: the ranks disagree on <key>: <value> on ranks 0, 2; <value> on rank 1 (and 2 more
//    keys differ). <hint>"
// naming the first key (in this rank 0's order) whose values differ; a key a rank lacks reads
// "<absent>".
void check_same_values(Communicator& comm, const std::vector<std::pair<std::string, std::string>>& entries,
                       const std::string& context, const std::string& hint = "");

}  // namespace lockstep::comm
