#pragma once
// Making every rank hold the same model: a cross-rank check that the models agree in structure,
// and a coalesced broadcast of their values from one rank.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lockstep/comm/agree.hpp"
#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/work.hpp"

namespace lockstep::ddp {

// A named tensor of a model, with what kind it is ("parameter", "buffer").
struct ModelEntry {
  std::string kind;
  std::string name;
  at::Tensor tensor;
};

// "parameter fc1.weight: float32 [64, 32] on cpu, requires grad": what must agree across ranks, with
// the tensor's device written as `device` (a label of device_labels); without it, its kind alone.
std::string describe(const ModelEntry& entry, const std::string& device);
std::string describe(const ModelEntry& entry);
// "cpu", "cuda": a device without its index.
std::string device_kind(const c10::Device& device);
// Each device as the ranks compare it (Note [Device labels]): its kind ("cpu", "cuda"), and where the
// list holds several devices of one kind, their number in first-seen order too ("cuda#0", "cuda#1").
// Which tensors share a GPU must agree across ranks (the buckets group by device); which GPU a rank
// has need not: each rank of a node has its own, so rank 1's model is on cuda:1 where rank 0's is on
// cuda:0.
std::vector<std::string> device_labels(const std::vector<c10::Device>& devices);

// Collective. Checks that every rank holds the same entries (count, order, names, shapes, dtypes,
// devices, requires_grad). Costs one all-gather of a 64-bit fingerprint when they agree. When
// they do not, every rank raises the same lockstep::Error naming the first entry that differs and
// which ranks hold which version of it, so no rank is left waiting for the others.
void check_same_model(comm::Communicator& comm, const std::vector<ModelEntry>& entries);

// Broadcasts `tensors` from `root`, grouped by dtype and device into flat buffers of about
// `cap_bytes` each (a handful of collectives instead of one per tensor). Returns one Work per
// group; after wait() the tensors hold root's values. The tensors must stay alive until then.
std::vector<comm::WorkPtr> broadcast_coalesced(comm::Communicator& comm, const std::vector<at::Tensor>& tensors,
                                               int root = 0, std::int64_t cap_bytes = std::int64_t{32} << 20);

}  // namespace lockstep::ddp
