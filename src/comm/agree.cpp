#include "lockstep/comm/agree.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <sstream>

#include "lockstep/core/error.hpp"
#include "core/exception_text.hpp"

namespace lockstep::comm {

std::uint64_t fingerprint(const std::string& text, std::uint64_t seed) {
  std::uint64_t hash = seed;
  for (unsigned char c : text) {
    hash ^= c;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

std::string rank_list(const std::vector<int>& ranks) {
  std::ostringstream os;
  os << (ranks.size() == 1 ? "rank " : "ranks ");
  for (std::size_t k = 0; k < ranks.size(); ++k) os << (k ? ", " : "") << ranks[k];
  return os.str();
}

std::vector<std::string> allgather_strings(Communicator& comm, const std::string& text) {
  const int size = comm.size();
  at::Tensor length = at::full({1}, static_cast<std::int64_t>(text.size()), at::kLong);
  at::Tensor lengths = at::empty({size}, at::kLong);
  comm.allgather(length, lengths)->wait();
  const auto* all_lengths = lengths.data_ptr<std::int64_t>();
  const std::int64_t longest = std::max<std::int64_t>(1, *std::max_element(all_lengths, all_lengths + size));
  at::Tensor mine = at::zeros({longest}, at::kByte);
  std::copy(text.begin(), text.end(), mine.data_ptr<std::uint8_t>());
  at::Tensor all = at::empty({size * longest}, at::kByte);
  comm.allgather(mine, all)->wait();
  std::vector<std::string> result(size);
  const auto* bytes = all.data_ptr<std::uint8_t>();
  for (int r = 0; r < size; ++r) {
    const char* start = reinterpret_cast<const char*>(bytes + r * longest);
    result[r].assign(start, start + all_lengths[r]);
  }
  return result;
}

std::vector<std::string> gather_strings(comm::Communicator& comm, const std::string& text, int root) {
  const int size = comm.size();
  const int rank = comm.rank();
  LOCKSTEP_CHECK(root >= 0 && root < size, "gather_strings: root ", root, " is not a rank of a world of ", size);
  at::Tensor length = at::full({1}, static_cast<std::int64_t>(text.size()), at::kLong);
  at::Tensor lengths = at::empty({size}, at::kLong);
  comm.allgather(length, lengths)->wait();
  const auto* all_lengths = lengths.data_ptr<std::int64_t>();
  const std::int64_t longest = std::max<std::int64_t>(1, *std::max_element(all_lengths, all_lengths + size));
  std::vector<std::string> result(rank == root ? size : 0);
  if (rank == root) result[root] = text;
  // One buffer, reused for every rank's turn. Root's own string and empty ones need no broadcast, and
  // every rank knows which those are.
  at::Tensor buffer = at::empty({longest}, at::kByte);
  for (int r = 0; r < size; ++r) {
    const std::int64_t n = all_lengths[r];
    if (r == root || n == 0) continue;
    at::Tensor part = buffer.narrow(0, 0, n);
    if (rank == r) std::copy(text.begin(), text.end(), part.data_ptr<std::uint8_t>());
    BroadcastOptions options;
    options.root = r;
    comm.broadcast(part, options)->wait();
    if (rank == root) {
      const char* start = reinterpret_cast<const char*>(part.data_ptr<std::uint8_t>());
      result[r].assign(start, start + n);
    }
  }
  return result;
}

// A wait for work on other ranks that outlasted the per-collective timeout: `what` says who and why,
// then the limit's knobs and the collective's own error.
static TimeoutError waited_too_long(const TimeoutError& e, const std::string& what) {
  return TimeoutError(detail::str_cat(what, ". The communicator's timeout (LOCKSTEP_TIMEOUT_S, runtime.timeout_s, or "
                                      "its options) allows longer. [", e.message(), "]"),
                      __FILE__, __LINE__);
}

void run_on_root(Communicator& comm, int root, const std::function<void()>& work, const std::string& context) {
  LOCKSTEP_CHECK(root >= 0 && root < comm.size(), "run_on_root: root ", root, " is not a rank of a world of ",
                 comm.size());
  std::string failure;
  if (comm.rank() == root) {
    try {
      work();
    } catch (const std::exception& e) {
      failure = e.what();
      if (failure.empty()) failure = "an exception without a message";
    } catch (...) {
      failure = "an exception that is not a std::exception";
    }
  }
  BroadcastOptions options;
  options.root = root;
  at::Tensor length = at::full({1}, static_cast<std::int64_t>(failure.size()), at::kLong);
  try {
    comm.broadcast(length, options)->wait();
  } catch (const TimeoutError& e) {
    if (comm.rank() == root) throw;
    // The others wait here for as long as `work` runs on root, with the timeout meant for one
    // collective: say so, naming what was running, instead of naming only a broadcast.
    throw waited_too_long(e,
                          detail::str_cat(context, ": rank ", root, " did not finish its part within ",
                                          comm.timeout().count(), " ms while this rank waited for it (rank ", root,
                                          " works alone here, e.g. writing a file: a slow or stuck disk, or it "
                                          "died)"));
  }
  const std::int64_t n = length.item<std::int64_t>();
  if (n == 0) return;
  at::Tensor bytes = at::zeros({n}, at::kByte);
  if (comm.rank() == root) std::copy(failure.begin(), failure.end(), bytes.data_ptr<std::uint8_t>());
  comm.broadcast(bytes, options)->wait();
  const char* start = reinterpret_cast<const char*>(bytes.data_ptr<std::uint8_t>());
  LOCKSTEP_CHECK(false, context, ": ", std::string(start, start + n), " (on rank ", root, "; this is rank ",
                 comm.rank(), ")");
}

void run_on_every_rank(Communicator& comm, const std::function<void()>& work, const std::string& context) {
  std::exception_ptr mine;
  std::string failure;
  try {
    work();
  } catch (...) {
    mine = std::current_exception();
    failure = detail::current_exception_text();
  }
  std::vector<std::string> failures;
  try {
    failures = allgather_strings(comm, failure);
  } catch (const TimeoutError& e) {
    // This rank's own error is the cause to report: the exchange timed out because another rank
    // was still working (a large file on a slow disk), and the job ends on this exception.
    if (mine) std::rethrow_exception(mine);
    throw waited_too_long(e,
                          detail::str_cat(context, ": another rank did not finish its part within ",
                                          comm.timeout().count(), " ms while this rank (", comm.rank(),
                                          ") had finished its own and waited (every rank works here, e.g. reading a "
                                          "file: a slow or stuck disk, or a rank died)"));
  } catch (...) {
    if (mine) std::rethrow_exception(mine);
    throw;
  }
  if (mine) std::rethrow_exception(mine);
  for (std::size_t r = 0; r < failures.size(); ++r) {
    LOCKSTEP_CHECK(failures[r].empty(), context, ": ", failures[r], " (on rank ", r, "; this is rank ", comm.rank(),
                   ")");
  }
}

namespace {

// Entries as "key\tvalue\n" lines; keys and values with tabs or newlines are escaped so that the
// split below is exact.
std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\\') out += "\\\\";
    else if (c == '\t') out += "\\t";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> split(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const std::size_t tab = line.find('\t');
    out.emplace_back(line.substr(0, tab), tab == std::string::npos ? "" : line.substr(tab + 1));
  }
  return out;
}

}  // namespace

void check_same_values(Communicator& comm, const std::vector<std::pair<std::string, std::string>>& entries,
                       const std::string& context, const std::string& hint) {
  std::string text;
  for (const auto& [key, value] : entries) text += escape(key) + "\t" + escape(value) + "\n";
  const int size = comm.size();
  at::Tensor mine = at::full({1}, static_cast<std::int64_t>(fingerprint(text)), at::kLong);
  at::Tensor all = at::empty({size}, at::kLong);
  comm.allgather(mine, all)->wait();
  const auto* prints = all.data_ptr<std::int64_t>();
  if (std::all_of(prints, prints + size, [&](std::int64_t p) { return p == prints[0]; })) return;

  // They differ: every rank gathers every rank's entries and writes the same message.
  const std::vector<std::string> texts = allgather_strings(comm, text);
  std::vector<std::map<std::string, std::string>> values(size);
  std::vector<std::string> keys;  // rank 0's order, then keys only other ranks have
  for (int r = 0; r < size; ++r) {
    for (auto& [key, value] : split(texts[r])) {
      if (values[r].emplace(key, value).second && std::find(keys.begin(), keys.end(), key) == keys.end()) {
        keys.push_back(key);
      }
    }
  }
  std::string first;
  std::size_t differing = 0;
  for (const std::string& key : keys) {
    std::vector<std::pair<std::string, std::vector<int>>> versions;  // value -> ranks, in rank order
    for (int r = 0; r < size; ++r) {
      auto it = values[r].find(key);
      const std::string value = it == values[r].end() ? "<absent>" : it->second;
      auto v = std::find_if(versions.begin(), versions.end(), [&](const auto& e) { return e.first == value; });
      if (v == versions.end()) versions.push_back({value, {r}});
      else v->second.push_back(r);
    }
    if (versions.size() < 2) continue;
    if (differing++ == 0) {
      std::ostringstream os;
      os << key << ": ";
      for (std::size_t k = 0; k < versions.size(); ++k) {
        os << (k ? "; " : "") << versions[k].first << " on " << rank_list(versions[k].second);
      }
      first = os.str();
    }
  }
  // The fingerprints differed, so some key does (or a 64-bit collision made two equal texts differ,
  // which the message then says rather than passing silently).
  if (differing == 0) first = "(no single key; the entries' order differs)";
  std::ostringstream more;
  if (differing > 1) more << " (and " << differing - 1 << " more differ)";
  LOCKSTEP_FAIL(context, ": the ranks disagree on ", first, more.str(), ". ", hint, hint.empty() ? "" : " ",
                "Every rank raises this error (rank ", comm.rank(), " of ", size, ").");
}

}  // namespace lockstep::comm
