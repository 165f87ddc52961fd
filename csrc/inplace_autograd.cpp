// torch's autograd contracts for the in-place ops (lstm_step_, lstm_multi_step_), as its own in-place
// ops keep them. Without these kernels the dispatcher falls through ADInplaceOrView and runs a default
// Autograd fallback, so (a) the written tensors' version counters never moved and a backward through a
// graph that had saved them silently used the new values, (b) a step on a leaf that requires grad was
// accepted, and (c) a call with inputs requiring grad gave results with no graph and no error.
//
// Both kernels are boxed and read which arguments are written from the schema's alias annotations
// (Tensor(a!), Tensor(a!)[]), so they serve every in-place op whatever its arguments.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <vector>

namespace l2l_fast {
namespace {

using Stack = torch::jit::Stack;

// The tensors of the op's arguments on `stack` (every one, or only those the schema marks as written).
std::vector<at::Tensor> argument_tensors(const c10::FunctionSchema& schema, const Stack& stack, bool written_only) {
  const auto& args = schema.arguments();
  const size_t first = stack.size() - args.size();
  std::vector<at::Tensor> tensors;
  for (size_t i = 0; i < args.size(); ++i) {
    if (written_only && !(args[i].alias_info() && args[i].alias_info()->isWrite())) continue;
    const c10::IValue& value = stack[first + i];
    if (value.isTensor()) {
      tensors.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorVector()) tensors.push_back(t);
    }
  }
  return tensors;
}

// Autograd: refuse what torch refuses for an in-place op without a derivative, then run below autograd.
void inplace_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    bool requires_grad = false;
    for (const at::Tensor& t : argument_tensors(op.schema(), *stack, false))
      requires_grad = requires_grad || (t.defined() && t.requires_grad());
    if (requires_grad) {
      // torch's own message for a leaf (or a view of one) that requires grad
      for (const at::Tensor& t : argument_tensors(op.schema(), *stack, true))
        torch::autograd::check_inplace(t, /*requires_grad=*/true);
      TORCH_CHECK(false, op.schema().name(), " has no derivative and some of its inputs require grad: call it under ",
                  "torch.no_grad() (as LearnedOptimizer.step does), or use the differentiable l2l_fast::lstm_step");
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView: every written tensor's version counter moves, so saved-tensor checks fire.
void inplace_version_bump(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack) {
  const std::vector<at::Tensor> written = argument_tensors(op.schema(), *stack, true);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written)
    if (t.defined()) torch::autograd::increment_version(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(l2l_fast, Autograd, m) {
  m.impl("lstm_step_", torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
  m.impl("lstm_multi_step_", torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
}

TORCH_LIBRARY_IMPL(l2l_fast, ADInplaceOrView, m) {
  m.impl("lstm_step_", torch::CppFunction::makeFromBoxedFunction<&inplace_version_bump>());
  m.impl("lstm_multi_step_", torch::CppFunction::makeFromBoxedFunction<&inplace_version_bump>());
}

}  // namespace l2l_fast
