#include "lockstep/ddp/model_sync.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <limits>
#include <map>
#include <sstream>

#include "lockstep/core/error.hpp"

namespace lockstep::ddp {

namespace {

// Sentinel for "this rank has no entry at this position" (a collision with a real fingerprint
// only costs a less precise message, never a missed difference: the whole-model fingerprints differ).
constexpr std::int64_t kMissing = std::numeric_limits<std::int64_t>::min();

using comm::rank_list;

// Each entry described with its device's label (Note [Device labels]).
std::vector<std::string> describe_all(const std::vector<ModelEntry>& entries) {
  std::vector<c10::Device> devices;
  for (const auto& entry : entries) {
    devices.push_back(entry.tensor.defined() ? entry.tensor.device() : c10::Device(c10::kCPU));
  }
  const std::vector<std::string> labels = device_labels(devices);
  std::vector<std::string> described;
  for (std::size_t k = 0; k < entries.size(); ++k) described.push_back(describe(entries[k], labels[k]));
  return described;
}

// This rank's devices in first-seen order ("cuda:1, cuda:0"): what the labels number.
std::string device_list(const std::vector<ModelEntry>& entries) {
  std::vector<c10::Device> seen;
  for (const auto& entry : entries) {
    if (!entry.tensor.defined()) continue;
    if (std::find(seen.begin(), seen.end(), entry.tensor.device()) == seen.end()) seen.push_back(entry.tensor.device());
  }
  std::string list;
  for (const auto& device : seen) list += (list.empty() ? "" : ", ") + device.str();
  return list;
}

std::string join_model(const std::vector<std::string>& described) {
  std::string all;
  for (const auto& text : described) all += text + "\n";
  return all;
}

}  // namespace

std::string device_kind(const c10::Device& device) { return c10::DeviceTypeName(device.type(), /*lower_case=*/true); }

// Note [Device labels]: the model check once compared devices with their index, and so refused every
// run of several ranks on a node of several GPUs (rank r on cuda:r). Comparing the kind alone would
// let a rank whose model spans two GPUs pass beside one whose model sits on one, and their buckets,
// grouped by device, would differ. So a device is its kind, numbered in first-seen order when one
// rank's model has several of that kind.
std::vector<std::string> device_labels(const std::vector<c10::Device>& devices) {
  std::map<c10::DeviceType, std::vector<c10::Device>> seen;
  for (const auto& device : devices) {
    auto& list = seen[device.type()];
    if (std::find(list.begin(), list.end(), device) == list.end()) list.push_back(device);
  }
  std::vector<std::string> labels;
  for (const auto& device : devices) {
    const auto& list = seen[device.type()];
    std::string label = device_kind(device);
    if (list.size() > 1) label += "#" + std::to_string(std::find(list.begin(), list.end(), device) - list.begin());
    labels.push_back(std::move(label));
  }
  return labels;
}

std::string describe(const ModelEntry& entry) {
  return describe(entry, entry.tensor.defined() ? device_kind(entry.tensor.device()) : "");
}

std::string describe(const ModelEntry& entry, const std::string& device) {
  std::ostringstream os;
  os << entry.kind << " " << entry.name << ": ";
  if (!entry.tensor.defined()) {
    os << "undefined";
  } else {
    const at::Tensor& t = entry.tensor;
    os << t.scalar_type() << " " << t.sizes() << " on " << device;
    // A parameter's slice of its gradient bucket has the parameter's memory order (Note [Gradient
    // layout] in reducer.cpp): a channels_last weight on one rank and a contiguous one on another
    // would sum unrelated elements. Strides of size-1 dimensions do not change that order ("-"); a
    // parameter with gaps or overlaps gets a contiguous slice, as a contiguous one does.
    if (entry.kind == "parameter" && !t.is_contiguous() && t.is_non_overlapping_and_dense()) {
      os << ", strides [";
      for (std::int64_t d = 0; d < t.dim(); ++d) {
        os << (d ? ", " : "");
        if (t.size(d) == 1) {
          os << "-";
        } else {
          os << t.stride(d);
        }
      }
      os << "]";
    }
    if (t.requires_grad()) os << ", requires grad";
  }
  return os.str();
}

void check_same_model(comm::Communicator& comm, const std::vector<ModelEntry>& entries) {
  const int size = comm.size();
  const int rank = comm.rank();
  if (size == 1) return;

  // Step 1: one fingerprint per rank. The common case ends here.
  const std::vector<std::string> described = describe_all(entries);
  at::Tensor mine = at::full({1}, static_cast<std::int64_t>(comm::fingerprint(join_model(described))), at::kLong);
  at::Tensor all = at::empty({size}, at::kLong);
  comm.allgather(mine, all)->wait();
  const auto* model_prints = all.data_ptr<std::int64_t>();
  if (std::all_of(model_prints, model_prints + size, [&](std::int64_t v) { return v == model_prints[0]; })) return;

  // Step 2: per-entry fingerprints, to find the first entry that differs. Every rank computes the
  // same index from the same gathered data, so all take the same path from here on.
  at::Tensor count = at::full({1}, static_cast<std::int64_t>(entries.size()), at::kLong);
  at::Tensor all_counts = at::empty({size}, at::kLong);
  comm.allgather(count, all_counts)->wait();
  const std::vector<std::int64_t> counts(all_counts.data_ptr<std::int64_t>(),
                                         all_counts.data_ptr<std::int64_t>() + size);
  const std::int64_t longest = std::max<std::int64_t>(1, *std::max_element(counts.begin(), counts.end()));
  at::Tensor entry_prints = at::full({longest}, kMissing, at::kLong);
  auto* entry_data = entry_prints.data_ptr<std::int64_t>();
  for (std::size_t k = 0; k < entries.size(); ++k) {
    entry_data[k] = static_cast<std::int64_t>(comm::fingerprint(described[k]));
  }
  at::Tensor gathered = at::empty({size * longest}, at::kLong);
  comm.allgather(entry_prints, gathered)->wait();
  const auto* prints = gathered.data_ptr<std::int64_t>();
  std::int64_t first = -1;
  for (std::int64_t k = 0; k < longest && first < 0; ++k) {
    for (int r = 1; r < size; ++r) {
      if (prints[r * longest + k] != prints[k]) {
        first = k;
        break;
      }
    }
  }

  std::ostringstream message;
  message << "DataParallel needs the same model on every rank, but the ranks' models differ";
  if (std::any_of(counts.begin(), counts.end(), [&](std::int64_t c) { return c != counts[0]; })) {
    message << " in size (parameters and buffers:";
    for (int r = 0; r < size; ++r) message << (r ? "," : "") << " rank " << r << " has " << counts[r];
    message << ")";
  }
  if (first >= 0) {
    // Step 3: the differing entry's description from every rank, grouped by version.
    const std::string here = first < static_cast<std::int64_t>(entries.size())
                                 ? described[static_cast<std::size_t>(first)]
                                 : "nothing (only " + std::to_string(entries.size()) + " entries)";
    const std::vector<std::string> versions = comm::allgather_strings(comm, here);
    std::map<std::string, std::vector<int>> holders;
    std::vector<std::string> order;
    for (int r = 0; r < size; ++r) {
      if (holders[versions[r]].empty()) order.push_back(versions[r]);
      holders[versions[r]].push_back(r);
    }
    message << ". The first difference is entry #" << first << " (counting parameters, then buffers, in "
            << "registration order):";
    for (const auto& version : order) message << "\n  " << rank_list(holders[version]) << ": " << version;
    // A label depends on all of a rank's devices (Note [Device labels]): one extra GPU late in the model
    // renumbers every entry before it. So say which devices each rank's labels stand for.
    const std::vector<std::string> devices = comm::allgather_strings(comm, device_list(entries));
    if (std::any_of(devices.begin(), devices.end(), [](const std::string& d) { return d.find(',') != std::string::npos; })) {
      message << "\n  Devices in first-seen order (cuda#0 is the first):";
      for (int r = 0; r < size; ++r) message << " rank " << r << ": " << devices[static_cast<std::size_t>(r)] << ";";
    }
  } else {
    message << " (their fingerprints differ, but no single entry does: a fingerprint collision)";
  }
  message << "\nThis is rank " << rank << ". Build the same model on every rank; DataParallel then copies "
          << "rank 0's values to the others.";
  LOCKSTEP_FAIL(message.str());
}

std::vector<comm::WorkPtr> broadcast_coalesced(comm::Communicator& comm, const std::vector<at::Tensor>& tensors,
                                               int root, std::int64_t cap_bytes) {
  std::vector<comm::WorkPtr> works;
  if (comm.size() == 1) return works;
  torch::autograd::AutoGradMode no_grad(false);
  // Group by dtype and device in first-seen order; the grouping depends only on the tensors'
  // metadata, which check_same_model has made identical on every rank (the device up to its index:
  // the groups are in first-seen order, which the labels of Note [Device labels] make agree).
  std::vector<std::vector<at::Tensor>> groups;
  std::map<std::string, std::size_t> open;
  std::map<std::size_t, std::int64_t> open_bytes;
  for (const auto& tensor : tensors) {
    if (!tensor.defined() || tensor.numel() == 0) continue;
    const std::string key = std::string(c10::toString(tensor.scalar_type())) + "@" + tensor.device().str();
    auto it = open.find(key);
    if (it == open.end()) {
      it = open.emplace(key, groups.size()).first;
      groups.emplace_back();
    }
    groups[it->second].push_back(tensor.detach());
    open_bytes[it->second] += static_cast<std::int64_t>(tensor.nbytes());
    if (open_bytes[it->second] >= cap_bytes) open.erase(it);
  }
  const bool is_root = comm.rank() == root;
  for (auto& group : groups) {
    std::vector<at::Tensor> flat_parts;
    flat_parts.reserve(group.size());
    // MPI has no bool; bools travel as bytes.
    for (const auto& t : group)
      flat_parts.push_back(t.scalar_type() == at::kBool ? t.reshape({-1}).to(at::kByte) : t.reshape({-1}));
    at::Tensor flat = at::cat(flat_parts);
    comm::WorkPtr work = comm.broadcast(flat, comm::BroadcastOptions{root});
    if (is_root) {
      // Root's tensors already hold the values; keep `flat` alive until the broadcast is done.
      works.push_back(comm::then(std::move(work), [flat] {}));
      continue;
    }
    works.push_back(comm::then(std::move(work), [flat, group = std::move(group)] {
      torch::autograd::AutoGradMode no_grad_here(false);
      std::int64_t offset = 0;
      for (const auto& t : group) {
        t.copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
        offset += t.numel();
      }
    }));
  }
  return works;
}

}  // namespace lockstep::ddp
