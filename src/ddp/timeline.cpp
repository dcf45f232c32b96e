#include "lockstep/ddp/timeline.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <limits>

#include "lockstep/comm/agree.hpp"
#include "lockstep/core/error.hpp"

namespace lockstep::ddp {

namespace {

double micros(comm::Clock::time_point t, comm::Clock::time_point origin) {
  return std::chrono::duration<double, std::micro>(t - origin).count();
}

nlohmann::json metadata(int rank) {
  nlohmann::json events = nlohmann::json::array();
  events.push_back(
      {{"name", "process_name"}, {"ph", "M"}, {"pid", rank}, {"args", {{"name", "rank " + std::to_string(rank)}}}});
  events.push_back({{"name", "process_sort_index"}, {"ph", "M"}, {"pid", rank}, {"args", {{"sort_index", rank}}}});
  events.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", rank}, {"tid", 0}, {"args", {{"name", "compute"}}}});
  events.push_back(
      {{"name", "thread_name"}, {"ph", "M"}, {"pid", rank}, {"tid", 1}, {"args", {{"name", "communication"}}}});
  return events;
}

void write_file(const std::string& path, const nlohmann::json& document) {
  std::ofstream out(path);
  LOCKSTEP_CHECK(out.good(), "cannot open trace file '", path, "' for writing");
  out << document.dump() << "\n";
  LOCKSTEP_CHECK(out.good(), "writing trace file '", path, "' failed");
}

}  // namespace

Timeline::Timeline(int rank, std::size_t max_events) : rank_(rank), max_events_(max_events) {}

void Timeline::add(Event event) {
  if (events_.size() >= max_events_) {
    ++dropped_;
    return;
  }
  events_.push_back(std::move(event));
}

void Timeline::clear() {
  events_.clear();
  dropped_ = 0;
}

std::string Timeline::to_json(comm::Clock::time_point origin) const {
  nlohmann::json events = metadata(rank_);
  for (const auto& e : events_) {
    nlohmann::json event = {{"name", e.name},
                            {"cat", e.track == Track::Compute ? "compute" : "communication"},
                            {"ph", "X"},
                            {"pid", rank_},
                            {"tid", static_cast<int>(e.track)},
                            {"ts", micros(e.begin, origin)},
                            {"dur", std::max(0.0, micros(e.end, e.begin))}};
    if (!e.args.empty()) {
      nlohmann::json args = nlohmann::json::object();
      for (const auto& [key, value] : e.args) args[key] = value;
      event["args"] = std::move(args);
    }
    events.push_back(std::move(event));
  }
  nlohmann::json document = {{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
  if (dropped_ > 0) document["otherData"] = {{"dropped_events", dropped_}};
  return document.dump();
}

void Timeline::write(const std::string& path) const {
  const comm::Clock::time_point origin = events_.empty() ? comm::Clock::now() : events_.front().begin;
  write_file(path, nlohmann::json::parse(to_json(origin)));
}

void Timeline::write_merged(comm::Communicator& comm, const std::string& path) const {
  // A common origin: the earliest event of any rank (steady_clock counts from boot on Linux, so
  // one host's ranks share it).
  const std::int64_t my_first =
      events_.empty()
          ? std::numeric_limits<std::int64_t>::max()
          : std::chrono::duration_cast<std::chrono::nanoseconds>(events_.front().begin.time_since_epoch()).count();
  at::Tensor first = at::full({1}, my_first, at::kLong);
  at::Tensor firsts = at::empty({comm.size()}, at::kLong);
  comm.allgather(first, firsts)->wait();
  std::int64_t origin_ns = firsts.min().item<std::int64_t>();
  if (origin_ns == std::numeric_limits<std::int64_t>::max()) origin_ns = 0;
  const comm::Clock::time_point origin{
      std::chrono::duration_cast<comm::Clock::duration>(std::chrono::nanoseconds(origin_ns))};

  const std::vector<std::string> documents = comm::allgather_strings(comm, to_json(origin));
  // Rank 0 writes the file; should it fail, every rank raises its error (Note [A failed checkpoint]).
  comm::run_on_root(comm, 0, [&] {
    nlohmann::json events = nlohmann::json::array();
    std::int64_t dropped = 0;
    for (const auto& text : documents) {
      nlohmann::json document = nlohmann::json::parse(text);
      for (auto& event : document["traceEvents"]) events.push_back(std::move(event));
      if (document.contains("otherData")) dropped += document["otherData"]["dropped_events"].get<std::int64_t>();
    }
    nlohmann::json merged = {{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
    if (dropped > 0) merged["otherData"] = {{"dropped_events", dropped}};
    write_file(path, merged);
  }, "DataParallel trace");
}

}  // namespace lockstep::ddp
