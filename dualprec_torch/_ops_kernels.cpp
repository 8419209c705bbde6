// AutocastCPU kernels that give torch.autocast("cpu") the cast rules of CUDA autocast's op
// table (dualprec_torch/ops.py builds this file and registers the kernels).
//
// One boxed kernel per aten overload, holding two rules: the one applied while a dualprec
// Precision context is active in this thread (or in a backward pass that replays one), and the
// one CPU autocast itself applies otherwise.  The casts are torch's own (at::autocast::cached_cast,
// which also shares torch's weight-cast cache), the op then runs with the AutocastCPU key
// excluded, as torch's C++ autocast kernels do.  The control functions are plain C symbols
// (called through ctypes): no Python object crosses this file.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <ATen/ops/cumsum_ops.h>
#include <ATen/ops/exp_ops.h>
#include <ATen/ops/layer_norm_ops.h>
#include <ATen/ops/log_ops.h>
#include <ATen/ops/log_softmax_ops.h>
#include <ATen/ops/native_layer_norm_ops.h>
#include <ATen/ops/pow_ops.h>
#include <ATen/ops/reciprocal_ops.h>
#include <ATen/ops/rms_norm_ops.h>
#include <ATen/ops/rsqrt_ops.h>
#include <ATen/ops/softmax_ops.h>
#include <ATen/ops/sum_ops.h>

#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace {

enum Rule : int {
  kPassthrough = 0,
  kUnlisted = 1,
  kLower = 2,
  kFp32 = 3,
  kFp32SetOptDtype = 4,
  kFp32AppendDtype = 5,
  kPromote = 6,
  kBanned = 7,
};

// ----- when the CUDA rule applies (mirrors ops._cuda_rule) ---------------------------------
thread_local int tl_depth = 0;         // Precision contexts entered in this thread
thread_local bool tl_backward = false; // inside Precision.backward
thread_local bool tl_replay = false;   // the last autocast forward of this thread ran under Precision

bool cuda_rule() {
  if (tl_depth > 0 || tl_backward) return true;
  if (!tl_replay) return false;
  if (torch::autograd::get_current_graph_task_id() != -1) return true;
  tl_replay = false; // a plain torch.autocast forward: CPU autocast's rules from here on
  return false;
}

const c10::DispatchKeySet kAutocastKey(c10::DispatchKey::AutocastCPU);
const c10::DispatchKeySet kAfter(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::AutocastCPU);

const char* kBannedMessage =
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast.  (dualprec applies CUDA autocast's table on CPU too.)";

inline bool eligible(const at::Tensor& t) {
  return t.defined() && t.is_floating_point() && t.scalar_type() != at::kDouble && t.is_cpu();
}

// Cast every tensor (and tensor in a list) among the n arguments on top of the stack.
void cast_args(torch::jit::Stack* stack, size_t n, at::ScalarType dtype) {
  const size_t first = stack->size() - n;
  for (size_t i = first; i < stack->size(); ++i) {
    c10::IValue& v = (*stack)[i];
    if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (eligible(t) && t.scalar_type() != dtype) v = at::autocast::cached_cast(dtype, t, c10::DeviceType::CPU);
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();
      bool any = false;
      for (const at::Tensor& t : list) any = any || (eligible(t) && t.scalar_type() != dtype);
      if (!any) continue;
      c10::List<at::Tensor> out;
      out.reserve(list.size());
      for (const at::Tensor& t : list) out.push_back(at::autocast::cached_cast(dtype, t, c10::DeviceType::CPU));
      v = c10::IValue(std::move(out));
    } else if (v.isList()) {
      auto list = v.toList();
      for (size_t j = 0; j < list.size(); ++j) {
        c10::IValue e = list.get(j);
        if (e.isTensor() && eligible(e.toTensor()) && e.toTensor().scalar_type() != dtype) {
          list.set(j, c10::IValue(at::autocast::cached_cast(dtype, e.toTensor(), c10::DeviceType::CPU)));
        }
      }
    }
  }
}

void visit_tensors(const torch::jit::Stack* stack, size_t n, const std::function<void(const at::Tensor&)>& f) {
  for (size_t i = stack->size() - n; i < stack->size(); ++i) {
    const c10::IValue& v = (*stack)[i];
    if (v.isTensor()) {
      f(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) f(t);
    } else if (v.isList()) {
      for (const c10::IValue& e : v.toListRef()) {
        if (e.isTensor()) f(e.toTensor());
      }
    }
  }
}

// at::autocast::prioritize over every tensor argument, starting from the compute dtype.
at::ScalarType widest(const torch::jit::Stack* stack, size_t n) {
  const at::ScalarType lower = at::autocast::get_autocast_dtype(at::kCPU);
  at::ScalarType current = lower;
  visit_tensors(stack, n, [&](const at::Tensor& t) {
    if (!eligible(t)) return;
    if (t.scalar_type() == at::kFloat || current == at::kFloat) {
      current = at::kFloat;
    } else if (t.scalar_type() != lower) {
      TORCH_CHECK(false, "Unexpected floating ScalarType in at::autocast::prioritize");
    }
  });
  return current;
}

struct Kernel final : public c10::OperatorKernel {
  Rule inside, outside;
  int dtype_pos = -1;                                 // fp32_set_opt_dtype: the dtype argument
  std::optional<c10::OperatorHandle> with_dtype;      // fp32_append_dtype: the overload with dtype=

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    run(cuda_rule() ? inside : outside, op, ks, stack);
  }

  void run(Rule rule, const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    const size_t n = op.schema().arguments().size();
    switch (rule) {
      case kPassthrough:
        op.redispatchBoxed(ks & kAfter, stack);
        return;
      case kUnlisted: {
        std::vector<c10::IValue> saved(stack->end() - n, stack->end());
        try {
          op.redispatchBoxed(ks & kAfter, stack);
          return;
        } catch (const c10::Error& err) {
          if (std::strstr(err.what(), "not implemented for") == nullptr) throw;
          std::optional<at::ScalarType> half;
          torch::jit::Stack args(saved.begin(), saved.end());
          visit_tensors(&args, n, [&](const at::Tensor& t) {
            if (!half && eligible(t) && t.scalar_type() != at::kFloat) half = t.scalar_type();
          });
          if (!half) throw;
          // the failed call left the stack in an unknown state: put the arguments back
          stack->resize(stack->size() >= n ? stack->size() - n : 0);
          stack->insert(stack->end(), saved.begin(), saved.end());
          const size_t before = stack->size() - n;
          run(kFp32, op, ks, stack);
          for (size_t i = before; i < stack->size(); ++i) {  // the outputs back to the input dtype
            c10::IValue& v = (*stack)[i];
            if (v.isTensor() && v.toTensor().scalar_type() == at::kFloat) v = v.toTensor().to(*half);
          }
          return;
        }
      }
      case kLower:
      case kFp32: {
        c10::impl::ExcludeDispatchKeyGuard guard(kAutocastKey);
        cast_args(stack, n, rule == kFp32 ? at::kFloat : at::autocast::get_autocast_dtype(at::kCPU));
        op.callBoxed(stack);
        return;
      }
      case kFp32SetOptDtype: {
        c10::impl::ExcludeDispatchKeyGuard guard(kAutocastKey);
        const c10::IValue& first = (*stack)[stack->size() - n];
        if (first.isTensor() && eligible(first.toTensor())) {
          c10::IValue& dtype = (*stack)[stack->size() - n + dtype_pos];
          if (dtype.isNone()) dtype = c10::IValue(at::kFloat);
        }
        op.callBoxed(stack);
        return;
      }
      case kFp32AppendDtype: {
        c10::impl::ExcludeDispatchKeyGuard guard(kAutocastKey);
        const c10::IValue& first = (*stack)[stack->size() - n];
        if (first.isTensor() && eligible(first.toTensor())) {
          stack->emplace_back(at::kFloat);
          with_dtype->callBoxed(stack);
        } else {
          op.callBoxed(stack);
        }
        return;
      }
      case kPromote: {
        const at::ScalarType dtype = widest(stack, n);
        c10::impl::ExcludeDispatchKeyGuard guard(kAutocastKey);
        cast_args(stack, n, dtype);
        op.callBoxed(stack);
        return;
      }
      case kBanned:
        TORCH_CHECK(false, kBannedMessage);
    }
  }
};

// ----- unboxed kernels for the float32-list ops models call most --------------------------
// The same rule as Kernel with (inside, outside) = (fp32 or fp32_set_opt_dtype, passthrough), through
// torch's own autocast wrapper (at::autocast::WrapFunction, what its CUDA kernels are made of) on
// the op's typed signature: no boxing of the arguments.
template <at::autocast::CastPolicy policy, class Op, class Sig = typename Op::schema>
struct Fast;

template <at::autocast::CastPolicy policy, class Op, class Ret, class... Args>
struct Fast<policy, Op, Ret(Args...)> {
  static Ret call(c10::DispatchKeySet ks, Args... args) {
    if (!cuda_rule()) return Op::redispatch(ks & kAfter, args...);
    return at::autocast::WrapFunction_<policy, c10::DeviceType::CPU, typename Op::schema, &Op::call, Ret,
                                       c10::guts::typelist::typelist<Args...>>::call(args...);
  }
};

using Register = std::function<void(torch::Library&, const char*)>;

template <at::autocast::CastPolicy policy, class Op>
std::pair<int, Register> fast() {
  const int rule = policy == at::autocast::CastPolicy::fp32 ? kFp32 : kFp32SetOptDtype;
  return {rule, [](torch::Library& lib, const char* name) { lib.impl(name, &Fast<policy, Op>::call); }};
}

// aten name -> (its inside rule, the registration of its unboxed kernel)
const std::map<std::string, std::pair<int, Register>>& fast_kernels() {
  using at::autocast::CastPolicy;
  static const std::map<std::string, std::pair<int, Register>> table = {
      {"exp", fast<CastPolicy::fp32, at::_ops::exp>()},
      {"log", fast<CastPolicy::fp32, at::_ops::log>()},
      {"pow.Tensor_Scalar", fast<CastPolicy::fp32, at::_ops::pow_Tensor_Scalar>()},
      {"pow.Tensor_Tensor", fast<CastPolicy::fp32, at::_ops::pow_Tensor_Tensor>()},
      {"rsqrt", fast<CastPolicy::fp32, at::_ops::rsqrt>()},
      {"reciprocal", fast<CastPolicy::fp32, at::_ops::reciprocal>()},
      {"layer_norm", fast<CastPolicy::fp32, at::_ops::layer_norm>()},
      {"native_layer_norm", fast<CastPolicy::fp32, at::_ops::native_layer_norm>()},
      {"rms_norm", fast<CastPolicy::fp32, at::_ops::rms_norm>()},
      {"sum", fast<CastPolicy::fp32_set_opt_dtype, at::_ops::sum>()},
      {"sum.dim_IntList", fast<CastPolicy::fp32_set_opt_dtype, at::_ops::sum_dim_IntList>()},
      {"softmax.int", fast<CastPolicy::fp32_set_opt_dtype, at::_ops::softmax_int>()},
      {"log_softmax.int", fast<CastPolicy::fp32_set_opt_dtype, at::_ops::log_softmax_int>()},
      {"cumsum", fast<CastPolicy::fp32_set_opt_dtype, at::_ops::cumsum>()},
  };
  return table;
}

struct Silent final : public c10::WarningHandler {
  void process(const c10::Warning&) override {}
};

std::unique_ptr<torch::Library>& library() {
  static std::unique_ptr<torch::Library> lib;
  return lib;
}

thread_local std::string tl_error;

}  // namespace

extern "C" {

void dualprec_optable_enter() {
  ++tl_depth;
  tl_replay = true;  // a backward of this forward replays under CUDA's rule
}

void dualprec_optable_exit() { --tl_depth; }

int dualprec_optable_set_backward(int on) {
  const int previous = tl_backward ? 1 : 0;
  tl_backward = on != 0;
  return previous;
}

int dualprec_optable_cuda_rule() { return cuda_rule() ? 1 : 0; }

int dualprec_optable_depth() { return tl_depth; }

// Whether `name` has an unboxed kernel (for the tests: each is checked against the boxed one).
int dualprec_optable_has_fast(const char* name) { return fast_kernels().count(name) ? 1 : 0; }

const char* dualprec_optable_error() { return tl_error.c_str(); }

// Register the kernel of one aten overload ("pow.Tensor_Scalar"): an unboxed one where
// fast_kernels() has this overload with these rules (fast != 0), else the boxed Kernel.  0 on
// success, else 1 with the reason in dualprec_optable_error().
int dualprec_optable_register(const char* name, int inside, int outside, int fast) {
  try {
    std::string full(name);
    if (!library()) {
      library() = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::AutocastCPU,
                                                   __FILE__, __LINE__);
    }
    Silent silent;  // "Overriding a previously registered kernel": intended for CPU autocast's own
    c10::WarningUtils::WarningHandlerGuard guard(&silent);
    const auto found = fast_kernels().find(full);
    if (fast && found != fast_kernels().end() && found->second.first == inside && outside == kPassthrough) {
      found->second.second(*library(), full.c_str());
      return 0;
    }
    const auto dot = full.find('.');
    const std::string base = "aten::" + full.substr(0, dot);
    const std::string overload = dot == std::string::npos ? "" : full.substr(dot + 1);
    auto kernel = std::make_unique<Kernel>();
    kernel->inside = static_cast<Rule>(inside);
    kernel->outside = static_cast<Rule>(outside);
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(base.c_str(), overload.c_str());
    if (inside == kFp32SetOptDtype || outside == kFp32SetOptDtype) {
      const auto& args = op.schema().arguments();
      for (size_t i = 0; i < args.size(); ++i) {
        if (args[i].name() == "dtype") kernel->dtype_pos = static_cast<int>(i);
      }
      TORCH_CHECK(kernel->dtype_pos >= 0, name, " has no dtype argument");
    }
    if (inside == kFp32AppendDtype || outside == kFp32AppendDtype) {
      const char* target = overload == "Scalar" ? "ScalarOpt_dtype" : overload == "ScalarOpt_dim" ? "ScalarOpt_dim_dtype" : nullptr;
      TORCH_CHECK(target != nullptr, "no dtype overload known for ", name);
      kernel->with_dtype = c10::Dispatcher::singleton().findSchemaOrThrow(base.c_str(), target);
    }
    library()->impl(full.c_str(), torch::CppFunction::makeFromBoxedFunctor(std::move(kernel)));
    return 0;
  } catch (const std::exception& err) {
    tl_error = err.what();
    return 1;
  }
}

// Drop every registered kernel (torch's own AutocastCPU kernels come back).
void dualprec_optable_unregister_all() { library().reset(); }

}  // extern "C"
