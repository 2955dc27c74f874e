// Convolutions on oneDNN primitives that sluice builds and owns, against the oneDNN library
// Debian packages (libdnnl 2.6, deploy/setup.sh installs it), made callable from Rust. It
// also compiles against oneDNN 3.x (the two `DNNL_VERSION_MAJOR` blocks), which
// benches/onednn3_probe.sh times against 2.6; 3.x has no FP32 Winograd, so `Fastest` finds
// only the direct kernel for 3×3 convolutions there.
//
// A `sluice_conv` holds one convolution: its bias, its weights reordered into the layout its
// kernel wants, and one ready primitive per input shape (batch, height, width) and post-op
// kind, made on first use and kept (at most kMaxPrimitives; beyond that a call builds a
// throwaway primitive). Activations are libtorch's channels-last tensors (`nhwc` to oneDNN),
// read and written in place, so the engine's gathers and scatter-adds work on them unchanged.
//
// Every function returns NULL on success or a malloc'ed message (freed with
// sluice_onednn_free_error) when oneDNN or libtorch throws; nothing throws across the C
// boundary.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

using at::Tensor;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

// Ready primitives one convolution keeps (input shapes × post-op kinds). A model's inputs
// have fixed dims and at most max_batch_size rows, so a served model stays far below.
constexpr size_t kMaxPrimitives = 256;

// The batch size a batched model's convolutions are prepared (and timed) for at load besides
// 1 (`BATCHED_PACK` in folded.rs).
constexpr int64_t kBatchedPack = 8;

enum class Post : int { None = 0, Relu = 1, AddRelu = 2 };

// How a 3×3 stride-1 convolution is computed: oneDNN's direct kernel on the channels-last
// activations, or its Winograd kernel, which wants blocked activations (reordered in and out
// around it). A strided 1×1 convolution (a ResNet's downsampling shortcut) has its own
// alternative: a reorder that keeps every stride-th position, then the stride-1 kernel
// (`Subsample`; oneDNN 2.6's strided 1×1 kernel ran ResNet-50's 512→1024 shortcut at 2/3 of
// the stride-1 kernel's rate). `Fastest` times both for the shapes prepared at load and keeps
// the faster; a shape first seen on a call is not timed (none on a request's path): a batch
// size between 1 and 8 (a mixed batch's sub-batch) takes the kernel both of those chose,
// anything else is direct. Every other convolution is direct.
enum class Algo : int { Fastest = 0, Direct = 1, Winograd = 2, Subsample = 3 };

// The kernel one primitive runs.
enum class Kind : int { Direct = 0, Winograd = 1, Subsample = 2 };

dnnl::engine& cpu() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// In-order and synchronous per thread: the calling engine thread waits for each primitive.
dnnl::stream& thread_stream() {
  thread_local dnnl::stream stream(cpu());
  return stream;
}

dt data_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return dt::f32;
    case at::kBFloat16: return dt::bf16;
    default: throw std::invalid_argument("oneDNN convolutions take float32 or bfloat16 tensors, not " +
                                         std::string(c10::toString(t.scalar_type())));
  }
}

struct Entry {
  dnnl::convolution_forward primitive;
  dnnl::memory weights;
  Kind kind = Kind::Direct;
  // `src_kernel`: what the kernel reads when it is not the caller's input. Winograd: blocked
  // activations in and out (`dst_blocked`), reordered from and to channels-last by `src_in`
  // and `dst_out` (`acc_in` brings a residual block's shortcut in). Subsample: a channels-last
  // copy of every stride-th input position, which `src_in` makes from `src_strided` (a view
  // of the input).
  dnnl::memory::desc src_kernel, dst_blocked, src_strided;
  dnnl::reorder src_in, acc_in, dst_out;
};

struct Conv {
  int64_t out_ch, in_ch, kernel, padding, stride;
  dt type;
  Algo algo = Algo::Fastest;
  dnnl::memory bias;  // f32, plain
  // Every packing made so far, one per distinct weight layout (the first is the load-time one,
  // and the source of any later one).
  std::vector<dnnl::memory> packs;
  // Keyed by (batch, height, width, post-op kind), packed into one integer.
  std::unordered_map<uint64_t, std::shared_ptr<Entry>> primitives;
  std::mutex lock;

  int64_t out_side(int64_t side) const { return (side + 2 * padding - kernel) / stride + 1; }

  // Channel counts that are not multiples of 16 take Winograd too: its blocked layouts pad
  // them, and oneDNN's reorders into those layouts write zeros into the padding (a probe that
  // filled the blocked buffers and packed weights with NaN first got exact results, every
  // test passing). a9f0e1f had excluded them after NaN logits in one fresh-clone CI run,
  // blaming stale padding; that cause was ruled out and none other was found
  // (docs/decisions.md).
  bool winograd_shape() const { return kernel == 3 && stride == 1; }

  // A 1×1 convolution reads one input position per output position: striding it is the same
  // as striding its input first. oneDNN describes the kept positions as a strided view only
  // where the stride divides the input's sides (its view of 7 of 13 rows would reach past
  // the input), which ResNets' even sides do; other sizes stay direct.
  bool subsample_shape(int64_t h, int64_t w) const {
    return kernel == 1 && padding == 0 && stride > 1 && h % stride == 0 && w % stride == 0;
  }

  // The kernel `Algo` asks for where the shape has it (`Fastest`: the other one to time).
  Kind alternative(int64_t h, int64_t w) const {
    if (winograd_shape() && (algo == Algo::Winograd || algo == Algo::Fastest)) return Kind::Winograd;
    if (subsample_shape(h, w) && (algo == Algo::Subsample || algo == Algo::Fastest)) return Kind::Subsample;
    return Kind::Direct;
  }

  dnnl::memory::desc src_desc(int64_t n, int64_t h, int64_t w) const { return {{n, in_ch, h, w}, type, tag::nhwc}; }
  dnnl::memory::desc dst_desc(int64_t n, int64_t h, int64_t w) const {
    return {{n, out_ch, out_side(h), out_side(w)}, type, tag::nhwc};
  }

  dnnl::convolution_forward::primitive_desc describe(int64_t n, int64_t h, int64_t w, Post post,
                                                     Kind kind = Kind::Direct) const {
    using dnnl::memory;
    const bool winograd = kind == Kind::Winograd;
    // Winograd picks its own (blocked) activation layout; direct reads and writes channels-last;
    // subsample reads a channels-last copy of the positions it keeps, at stride 1.
    memory::desc src = winograd                  ? memory::desc({n, in_ch, h, w}, type, tag::any)
                       : kind == Kind::Subsample ? src_desc(n, out_side(h), out_side(w))
                                                 : src_desc(n, h, w);
    memory::desc dst = winograd ? memory::desc({n, out_ch, out_side(h), out_side(w)}, type, tag::any)
                                : dst_desc(n, h, w);
    const int64_t step = kind == Kind::Subsample ? 1 : stride;
    memory::desc weights({out_ch, in_ch, kernel, kernel}, type, tag::any);
    memory::desc bias_md({out_ch}, dt::f32, tag::x);
    dnnl::post_ops ops;
    if (post == Post::AddRelu) ops.append_sum(1.f);
#if DNNL_VERSION_MAJOR >= 3
    if (post != Post::None) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
#else
    if (post != Post::None) ops.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
#endif
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    auto algorithm = winograd ? dnnl::algorithm::convolution_winograd : dnnl::algorithm::convolution_direct;
#if DNNL_VERSION_MAJOR >= 3
    return dnnl::convolution_forward::primitive_desc(cpu(), dnnl::prop_kind::forward_inference, algorithm, src,
                                                     weights, bias_md, dst, {step, step}, {padding, padding},
                                                     {padding, padding}, attr);
#else
    dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_inference, algorithm, src, weights, bias_md, dst,
                                         {step, step}, {padding, padding}, {padding, padding});
    return dnnl::convolution_forward::primitive_desc(desc, attr, cpu());
#endif
  }

  // The packing `want` describes: an existing one, or a reorder of the first (lock held).
  // Winograd's weight formats are reached through the plain layout.
  dnnl::memory pack(const dnnl::memory::desc& want) {
    for (auto& p : packs)
      if (p.get_desc() == want) return p;
    dnnl::memory made(want, cpu());
    dnnl::stream s(cpu());
#if DNNL_VERSION_MAJOR >= 3
    if (want.get_format_kind() != dnnl::memory::format_kind::blocked) {
#else
    if (want.data.format_kind == dnnl_format_kind_wino) {
#endif
      dnnl::memory plain({{out_ch, in_ch, kernel, kernel}, type, tag::oihw}, cpu());
      dnnl::reorder(packs.front(), plain).execute(s, packs.front(), plain);
      dnnl::reorder(plain, made).execute(s, plain, made);
    } else {
      dnnl::reorder(packs.front(), made).execute(s, packs.front(), made);
    }
    s.wait();
    packs.push_back(made);
    return made;
  }

  std::shared_ptr<Entry> make(int64_t n, int64_t h, int64_t w, Post post, Kind kind) {
    auto pd = describe(n, h, w, post, kind);
    auto e = std::make_shared<Entry>();
    e->primitive = dnnl::convolution_forward(pd);
    e->weights = pack(pd.weights_desc());
    e->kind = kind;
    if (kind == Kind::Subsample) {
      const int64_t oh = out_side(h), ow = out_side(w);
      // The kept positions of channels-last `n × h × w` input, as an `n × oh × ow` view.
      e->src_strided =
          dnnl::memory::desc({n, in_ch, oh, ow}, type, {h * w * in_ch, 1, stride * w * in_ch, stride * in_ch});
      e->src_kernel = pd.src_desc();
      e->src_in = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), e->src_strided, cpu(), e->src_kernel));
    } else if (kind == Kind::Winograd) {
      e->src_kernel = pd.src_desc();
      e->dst_blocked = pd.dst_desc();
      e->src_in = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), src_desc(n, h, w), cpu(), e->src_kernel));
      e->acc_in = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), dst_desc(n, h, w), cpu(), e->dst_blocked));
      e->dst_out = dnnl::reorder(dnnl::reorder::primitive_desc(cpu(), e->dst_blocked, cpu(), dst_desc(n, h, w)));
    }
    return e;
  }

  // `e` on channels-last `src` into channels-last `dst` (which holds the shortcut for AddRelu).
  void execute(const Entry& e, dnnl::memory& src, dnnl::memory& dst, Post post) {
    dnnl::stream& s = thread_stream();
    if (e.kind == Kind::Direct) {
      e.primitive.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_BIAS, bias},
                              {DNNL_ARG_DST, dst}});
    } else if (e.kind == Kind::Subsample) {
      dnnl::memory view(e.src_strided, cpu(), src.get_data_handle()), xs(e.src_kernel, cpu());
      e.src_in.execute(s, view, xs);
      e.primitive.execute(s, {{DNNL_ARG_SRC, xs}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_BIAS, bias},
                              {DNNL_ARG_DST, dst}});
    } else {
      dnnl::memory xs(e.src_kernel, cpu()), ys(e.dst_blocked, cpu());
      e.src_in.execute(s, src, xs);
      if (post == Post::AddRelu) e.acc_in.execute(s, dst, ys);
      e.primitive.execute(s, {{DNNL_ARG_SRC, xs}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_BIAS, bias},
                              {DNNL_ARG_DST, ys}});
      e.dst_out.execute(s, ys, dst);
    }
    s.wait();
  }

  // Whether `a` ran faster than `b` on zeros of the shape: both alternately, at least 5 runs
  // each and about 2 ms of the slower in all (at most 50 each), the first of each discarded,
  // medians compared.
  bool faster(const Entry& a, const Entry& b, int64_t n, int64_t h, int64_t w, Post post) {
    dnnl::memory src(src_desc(n, h, w), cpu()), dst(dst_desc(n, h, w), cpu());
    std::memset(src.get_data_handle(), 0, src.get_desc().get_size());
    std::memset(dst.get_data_handle(), 0, dst.get_desc().get_size());
    auto once = [&](const Entry& e) {
      auto start = std::chrono::steady_clock::now();
      execute(e, src, dst, post);
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    };
    const double first = std::max(once(a), once(b));
    const int runs = static_cast<int>(std::clamp(2.0 / std::max(first, 1e-3), 5.0, 50.0));
    std::vector<double> ta, tb;
    for (int i = 0; i < runs; i++) {
      ta.push_back(once(a));
      tb.push_back(once(b));
    }
    std::sort(ta.begin(), ta.end());
    std::sort(tb.begin(), tb.end());
    return ta[runs / 2] < tb[runs / 2];
  }

  // Forgets the packings no kept primitive (nor `also`) uses, but the first: what the losing
  // kernel of a timing packed (Winograd's weights are 4× the size of direct's). Lock held.
  void drop_unused_packs(const Entry& also) {
    auto used = [&](const dnnl::memory& p) {
      if (p.get_data_handle() == also.weights.get_data_handle()) return true;
      for (const auto& kv : primitives)
        if (kv.second->weights.get_data_handle() == p.get_data_handle()) return true;
      return false;
    };
    for (size_t i = packs.size(); i-- > 1;)
      if (!used(packs[i])) packs.erase(packs.begin() + static_cast<std::ptrdiff_t>(i));
  }

  // The primitive for inputs of `n × h × w` with `post`, made if new; `measure`: a shape
  // prepared at load, where `Fastest` times both kernels.
  std::shared_ptr<Entry> entry(int64_t n, int64_t h, int64_t w, Post post, bool measure = false) {
    if (n < 1 || h < 1 || w < 1 || n >= (1 << 20) || h >= (1 << 20) || w >= (1 << 20))
      throw std::invalid_argument("convolution input of batch " + std::to_string(n) + " and size " +
                                  std::to_string(h) + "x" + std::to_string(w) + " is out of range");
    auto key_of = [&](int64_t batch) {
      return (static_cast<uint64_t>(batch) << 42) | (static_cast<uint64_t>(h) << 22) |
             (static_cast<uint64_t>(w) << 2) | static_cast<uint64_t>(post);
    };
    const uint64_t key = key_of(n);
    std::lock_guard<std::mutex> guard(lock);
    auto found = primitives.find(key);
    if (found != primitives.end()) return found->second;
    std::shared_ptr<Entry> made;
    const Kind other = alternative(h, w);
    // The kernel both sizes timed at load chose (Direct where they differ or one is missing).
    auto timed = [&](int64_t batch) {
      auto it = primitives.find(key_of(batch));
      return it == primitives.end() ? Kind::Direct : it->second->kind;
    };
    if (algo != Algo::Fastest) {
      made = make(n, h, w, post, other);  // what was asked, where the shape has it
    } else if (!measure || other == Kind::Direct) {
      // Not timed: a size between 1 and 8 (a mixed batch's sub-batch) takes the kernel both
      // of those chose; anything else is direct.
      const bool between = n > 1 && n < kBatchedPack && timed(1) == other && timed(kBatchedPack) == other;
      made = make(n, h, w, post, between ? other : Kind::Direct);
    } else {
      made = make(n, h, w, post, Kind::Direct);
      std::shared_ptr<Entry> contender;
      try {
        contender = make(n, h, w, post, other);
      } catch (const dnnl::error&) {
        // No such kernel for this shape, precision or CPU: direct it is.
      }
      if (contender && faster(*contender, *made, n, h, w, post)) made = contender;
      drop_unused_packs(*made);
    }
    if (primitives.size() < kMaxPrimitives) primitives.emplace(key, made);
    return made;
  }

  void check_input(const Tensor& x) const {
    if (x.dim() != 4 || x.size(1) != in_ch)
      throw std::invalid_argument("convolution input " + std::string(c10::str(x.sizes())) + " is not [N, " +
                                  std::to_string(in_ch) + ", H, W]");
    if (data_type(x) != type) throw std::invalid_argument("convolution input in another precision than its weights");
  }

  // Runs the primitive for `x` (channels-last) into `out` (channels-last, output shape).
  void run(const Tensor& x, Tensor& out, Post post) {
    const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
    auto e = entry(n, h, w, post);
    dnnl::memory src(src_desc(n, h, w), cpu(), x.data_ptr());
    dnnl::memory dst(dst_desc(n, h, w), cpu(), out.data_ptr());
    execute(*e, src, dst, post);
  }
};

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
  } catch (const dnnl::error& e) {
    return error_message((std::string("oneDNN: ") + e.what()).c_str());
  } catch (const std::exception& e) {
    return error_message(e.what());
  } catch (...) {
    return error_message("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

struct sluice_conv;

// Whether oneDNN runs here: makes its CPU engine (fails where the library cannot).
char* sluice_onednn_check() {
  return guarded([] { cpu(); });
}

// A convolution from its plain weight ([O, I, k, k], float32 or bfloat16: the precision it
// runs in) and float32 bias ([O]), packed for inputs of `n × h × w` (its primitive for that
// shape made now, with `post`); `algo` is an `Algo`.
char* sluice_onednn_conv_new(const Tensor* weight, const Tensor* bias, int64_t padding, int64_t stride,
                             const int64_t* input_size, int post, int algo, sluice_conv** out) {
  return guarded([&] {
    Tensor wt = weight->contiguous();
    if (wt.dim() != 4 || wt.size(2) != wt.size(3))
      throw std::invalid_argument("a convolution weight is [O, I, k, k], not " + std::string(c10::str(wt.sizes())));
    Tensor b = bias->to(at::kFloat).contiguous();
    if (b.dim() != 1 || b.size(0) != wt.size(0)) throw std::invalid_argument("the bias does not match the weight");
    auto conv = std::make_unique<Conv>();
    conv->out_ch = wt.size(0);
    conv->in_ch = wt.size(1);
    conv->kernel = wt.size(2);
    conv->padding = padding;
    conv->stride = stride;
    conv->type = data_type(wt);
    if (algo < 0 || algo > 3) throw std::invalid_argument("unknown convolution algorithm");
    conv->algo = static_cast<Algo>(algo);
    conv->bias = dnnl::memory({{conv->out_ch}, dt::f32, tag::x}, cpu());
    std::memcpy(conv->bias.get_data_handle(), b.data_ptr(), sizeof(float) * conv->out_ch);
    auto pd = conv->describe(input_size[0], input_size[2], input_size[3], static_cast<Post>(post));
    dnnl::memory plain({{conv->out_ch, conv->in_ch, conv->kernel, conv->kernel}, conv->type, tag::oihw}, cpu(),
                       wt.data_ptr());
    dnnl::memory packed(pd.weights_desc(), cpu());
    dnnl::stream s(cpu());
    dnnl::reorder(plain, packed).execute(s, plain, packed);
    s.wait();
    conv->packs.push_back(packed);
    conv->entry(input_size[0], input_size[2], input_size[3], static_cast<Post>(post), true);
    *out = reinterpret_cast<sluice_conv*>(conv.release());
  });
}

// Makes (and keeps) the primitive for inputs of `n × h × w` with `post` ahead of its first
// call, timing both kernels where the convolution's `Algo` is `Fastest`.
char* sluice_onednn_conv_prepare(sluice_conv* conv, const int64_t* input_size, int post) {
  return guarded([&] {
    reinterpret_cast<Conv*>(conv)->entry(input_size[0], input_size[2], input_size[3], static_cast<Post>(post), true);
  });
}

// conv(x) + bias, then ReLU when `relu` is non-zero: a new channels-last tensor.
char* sluice_onednn_conv_run(sluice_conv* handle, const Tensor* x, int relu, Tensor** out) {
  return guarded([&] {
    Conv& conv = *reinterpret_cast<Conv*>(handle);
    conv.check_input(*x);
    Tensor input = x->contiguous(at::MemoryFormat::ChannelsLast);
    Tensor y = at::empty({input.size(0), conv.out_ch, conv.out_side(input.size(2)), conv.out_side(input.size(3))},
                         input.options().memory_format(at::MemoryFormat::ChannelsLast));
    conv.run(input, y, relu ? Post::Relu : Post::None);
    *out = new Tensor(std::move(y));
  });
}

// acc = relu(conv(x) + bias + acc), written into `acc` (channels-last, the output's shape):
// the end of a residual block.
char* sluice_onednn_conv_add_relu_(sluice_conv* handle, Tensor* acc, const Tensor* x) {
  return guarded([&] {
    Conv& conv = *reinterpret_cast<Conv*>(handle);
    conv.check_input(*x);
    Tensor input = x->contiguous(at::MemoryFormat::ChannelsLast);
    std::vector<int64_t> want{input.size(0), conv.out_ch, conv.out_side(input.size(2)), conv.out_side(input.size(3))};
    if (acc->sizes() != c10::IntArrayRef(want) || acc->scalar_type() != input.scalar_type())
      throw std::invalid_argument("the shortcut " + std::string(c10::str(acc->sizes())) +
                                  " does not match the convolution's output");
    if (!acc->is_contiguous(at::MemoryFormat::ChannelsLast))
      throw std::invalid_argument("the shortcut is not a contiguous channels-last tensor");
    conv.run(input, *acc, Post::AddRelu);
  });
}

// How many weight packings and ready primitives the convolution holds, and how many of
// those primitives are Winograd and subsample ones.
void sluice_onednn_conv_counts(sluice_conv* handle, int64_t* packs, int64_t* primitives, int64_t* winograd,
                               int64_t* subsample) {
  Conv& conv = *reinterpret_cast<Conv*>(handle);
  std::lock_guard<std::mutex> guard(conv.lock);
  *packs = static_cast<int64_t>(conv.packs.size());
  *primitives = static_cast<int64_t>(conv.primitives.size());
  auto count = [&](Kind kind) {
    return std::count_if(conv.primitives.begin(), conv.primitives.end(),
                         [&](const auto& kv) { return kv.second->kind == kind; });
  };
  *winograd = count(Kind::Winograd);
  *subsample = count(Kind::Subsample);
}

void sluice_onednn_conv_free(sluice_conv* handle) { delete reinterpret_cast<Conv*>(handle); }

void sluice_onednn_free_error(char* message) { std::free(message); }

}  // extern "C"
