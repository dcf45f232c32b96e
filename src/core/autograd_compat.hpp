#pragma once
// Note [LibTorch versions] (src/core/torch_compat.hpp), for the autograd graph: LibTorch 1.13 owns
// autograd nodes through std::shared_ptr (Node derives from enable_shared_from_this, and nodes made by
// hand take torch::autograd::deleteNode as deleter); later 2.x owns them through c10::intrusive_ptr
// (Node derives from c10::intrusive_ptr_target; deleteNode is gone). These helpers pick the form from
// the Node type itself, not from a version number, so no version in between needs to be known. Both
// branches sit in templates, so the one not taken is never instantiated.

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace lockstep::compat {

template <class N = torch::autograd::Node>
inline constexpr bool kIntrusiveAutogradNodes = std::is_base_of_v<c10::intrusive_ptr_target, N>;

// The owning pointer type of autograd nodes in this LibTorch.
using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));

// A new node of type T (derived from Node), owned as the graph expects.
template <class T, class... Args>
auto make_autograd_node(Args&&... args) {
  if constexpr (kIntrusiveAutogradNodes<T>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    // deleteNode releases long chains of nodes without deep recursion; found by argument-dependent
    // lookup on T's base, so this line means nothing where the function does not exist.
    return std::shared_ptr<T>(new T(std::forward<Args>(args)...), [](T* node) { deleteNode(node); });
  }
}

// An owning pointer to `node`, which the graph already owns (inside Node::apply): what
// SavedVariable::unpack takes.
template <class T, class NodeT = torch::autograd::Node>
auto owning_node_ptr(T* node) {
  if constexpr (kIntrusiveAutogradNodes<T>) {
    return c10::intrusive_ptr<NodeT>::unsafe_reclaim_from_nonowning(node);
  } else {
    return node->shared_from_this();
  }
}

}  // namespace lockstep::compat
