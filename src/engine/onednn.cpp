// oneDNN's fused convolutions, as libtorch registers them for its own compiler
// (`mkldnn::_convolution_pointwise` and friends), made callable from Rust. tch binds only
// the ATen operators of native_functions.yaml, and these live in the `mkldnn` operator
// library, so they are reached through the dispatcher here, by name.
//
// Every function takes and returns `at::Tensor*` (what tch's `C_tensor` points to) and
// returns NULL on success or a malloc'ed message (freed with sluice_onednn_free_error) when
// libtorch throws; nothing throws across the C boundary.

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/Scalar.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string_view>
#include <vector>

using at::Tensor;
using ScalarList = c10::List<std::optional<c10::Scalar>>;

namespace {

// The C++ signatures libtorch 2.11 registers these operators with (see `nm -DC
// libtorch_cpu.so | grep mkldnn_convolution_pointwise`); a mismatch throws at lookup.
using Pointwise = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::IntArrayRef,
                         c10::IntArrayRef, c10::IntArrayRef, int64_t, std::string_view, ScalarList,
                         std::optional<std::string_view>);
using BinaryInPlace = Tensor&(Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                              c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t,
                              std::string_view, std::optional<c10::Scalar>, std::optional<std::string_view>,
                              ScalarList, std::optional<std::string_view>);

const c10::TypedOperatorHandle<Pointwise>& pointwise() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "").typed<Pointwise>();
  return op;
}

const c10::TypedOperatorHandle<BinaryInPlace>& binary_in_place() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_convolution_pointwise_", "binary")
                             .typed<BinaryInPlace>();
  return op;
}

const c10::OperatorHandle& reorder_weight() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_convolution_weight", "");
  return op;
}

char* error_message(const char* what) {
  char* copy = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (copy != nullptr) std::strcpy(copy, what);
  return copy;
}

template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  } catch (...) {
    return error_message("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

// Looks every operator up once: fails (with libtorch's message) when this libtorch lacks
// them or registers them with another signature.
char* sluice_onednn_check() {
  return guarded([] {
    pointwise();
    binary_in_place();
    reorder_weight();
  });
}

// `weight` (plain, [O, I, kH, kW]) reordered into the blocked layout oneDNN's kernel picks
// for inputs of `input_size` ([N, C, H, W]): a oneDNN tensor.
char* sluice_onednn_pack_weight(const Tensor* weight, int64_t padding, int64_t stride, const int64_t* input_size,
                                Tensor** out) {
  return guarded([&] {
    torch::jit::Stack stack;
    stack.emplace_back(*weight);
    stack.emplace_back(std::vector<int64_t>{padding, padding});
    stack.emplace_back(std::vector<int64_t>{stride, stride});
    stack.emplace_back(std::vector<int64_t>{1, 1});
    stack.emplace_back(int64_t{1});
    stack.emplace_back(std::vector<int64_t>(input_size, input_size + 4));
    reorder_weight().callBoxed(stack);
    *out = new Tensor(stack.back().toTensor());
  });
}

// conv(x, weight) + bias, then ReLU when `relu` is non-zero: one oneDNN primitive.
char* sluice_onednn_conv(const Tensor* x, const Tensor* weight, const Tensor* bias, int64_t padding, int64_t stride,
                         int relu, Tensor** out) {
  return guarded([&] {
    const int64_t pad[2] = {padding, padding}, str[2] = {stride, stride}, dil[2] = {1, 1};
    Tensor y = pointwise().call(*x, *weight, *bias, pad, str, dil, 1, relu ? "relu" : "none", ScalarList(),
                                std::nullopt);
    *out = new Tensor(std::move(y));
  });
}

// acc = relu(conv(x, weight) + bias + acc), written into `acc`: the end of a residual block.
char* sluice_onednn_conv_add_relu_(Tensor* acc, const Tensor* x, const Tensor* weight, const Tensor* bias,
                                   int64_t padding, int64_t stride) {
  return guarded([&] {
    const int64_t pad[2] = {padding, padding}, str[2] = {stride, stride}, dil[2] = {1, 1};
    binary_in_place().call(*acc, *x, *weight, *bias, pad, str, dil, 1, "add", c10::Scalar(1.0), "relu",
                           ScalarList(), std::nullopt);
  });
}

void sluice_onednn_free_error(char* message) { std::free(message); }

}  // extern "C"
