#pragma once
// Timeline: what one rank did when, written as Chrome trace JSON (chrome://tracing, ui.perfetto.dev):
// one process per rank (pid = rank), a "compute" track (forward, backward, the final wait) and a
// "communication" track (each bucket's all-reduce as the communicator ran it).

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/work.hpp"

namespace lockstep::ddp {

class Timeline {
 public:
  enum class Track { Compute = 0, Communication = 1 };
  struct Event {
    std::string name;
    Track track = Track::Compute;
    comm::Clock::time_point begin, end;
    std::vector<std::pair<std::string, double>> args;  // shown when the event is selected
  };

  // Events past `max_events` are counted, not kept, so a forgotten trace cannot eat the memory.
  explicit Timeline(int rank, std::size_t max_events = 1'000'000);

  void add(Event event);
  std::size_t size() const { return events_.size(); }
  std::size_t dropped() const { return dropped_; }
  void clear();

  // This rank's events as a Chrome trace document; timestamps in microseconds from `origin`.
  std::string to_json(comm::Clock::time_point origin) const;
  // Writes this rank's events alone (timestamps from its first event).
  void write(const std::string& path) const;
  // Collective: gathers every rank's events and rank 0 writes them to `path` as one trace, on one
  // time axis (steady_clock: aligned across the ranks of one host; ranks on different hosts are
  // offset by their clocks' difference).
  void write_merged(comm::Communicator& comm, const std::string& path) const;

 private:
  int rank_;
  std::size_t max_events_;
  std::size_t dropped_ = 0;
  std::vector<Event> events_;
};

}  // namespace lockstep::ddp
