#pragma once
// Note [Bucket order across a resume] (reducer.cpp): whether an order read back from a checkpoint is
// one of a model's parameters. Internal: the Reducer and the Checkpointer check the same way.

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lockstep::ddp {

// Whether `order` holds each index in [0, n) exactly once.
bool is_parameter_order(const std::vector<std::int64_t>& order, std::size_t n);

}  // namespace lockstep::ddp
