// Convolutions for training on the CPU through oneDNN, in the memory layouts oneDNN prefers.
//
// MindSpore's CPU Conv2D kernels hand oneDNN plain NCHW tensors, for which oneDNN runs an im2col +
// GEMM implementation; left free to choose the layout ("any"), it runs its direct kernels on blocked
// layouts, which take less time per convolution on the same cores (bench/README.md). The functions
// at the end are MindSpore "aot" custom operators: a bias-free 2-D convolution with symmetric zero
// padding (k - 1) / 2 and the stride implied by the shapes (the forward pass, the gradient of the input,
// the gradient of the weights), PReLU with one slope per channel (forward, input gradient) in one pass
// over the tensor where the same arithmetic in MindSpore's element-wise kernels takes several, and
// batch normalization in training (forward with the moving statistics, backward) in loops of our own.
// They take and return plain NCHW / OIHW float32 tensors; the convolutions reorder to and from the
// blocked layouts inside. Built by src/models/cpu_ops.py against the oneDNN library MindSpore ships,
// whose CPU runtime is a threadpool: the pool below is ours, and the batch normalization runs on it too.

#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_threadpool.h>
#include <oneapi/dnnl/dnnl_threadpool_iface.hpp>
#include <dlfcn.h>
#include <sched.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <cmath>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// A fixed set of threads that runs oneDNN's parallel sections; the calling thread takes part.
class Pool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~Pool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto &worker : workers_) worker.join();
  }
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return in_parallel_; }
  uint64_t get_flags() const override { return 0; }  // synchronous: parallel_for returns when done
  void wait() override {}

  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 0) return;
    if (n == 1 || threads_ == 1 || in_parallel_) {
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
    uint64_t generation;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      total_ = n;
      finished_.store(0);
      generation = ++generation_;
      next_.store(generation << 32);  // (generation, next task): a late thread cannot take a new job's task
    }
    wake_.notify_all();
    Run(generation);
    while (finished_.load() < n) std::this_thread::yield();
  }

 private:
  void Run(uint64_t generation) {
    in_parallel_ = true;
    for (;;) {
      uint64_t claim = next_.load();
      if ((claim >> 32) != generation || static_cast<int>(claim & 0xffffffffu) >= total_) break;
      if (!next_.compare_exchange_weak(claim, claim + 1)) continue;
      (*job_)(static_cast<int>(claim & 0xffffffffu), total_);
      finished_.fetch_add(1);
    }
    in_parallel_ = false;
  }
  void Work() {
    uint64_t seen = 0;
    for (;;) {
      uint64_t generation;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        generation = seen = generation_;
      }
      Run(generation);
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  const std::function<void(int, int)> *job_ = nullptr;
  int total_ = 0;
  std::atomic<uint64_t> next_{0};
  std::atomic<int> finished_{0};
  static thread_local bool in_parallel_;
};
thread_local bool Pool::in_parallel_ = false;

// oneDNN's C API, from a private copy of MindSpore's oneDNN library (ONEDNN_COPY, set when building),
// opened with its own symbols first: a second instance of the library, whose instruction-set limit is
// its own. MindSpore's instance stays at the ONEDNN_MAX_CPU_ISA=AVX2 src/runtime.py sets (its plain-layout
// convolutions fall back to reference code above it); ours runs the blocked-layout kernels at the best
// instruction set the CPU has.
struct Api {
#define ONEDNN_FUNCTIONS(X)                                                                                 \
  X(convolution_backward_data_primitive_desc_create) X(convolution_backward_weights_primitive_desc_create)  \
  X(convolution_forward_primitive_desc_create) X(engine_create) X(memory_create) X(memory_desc_clone)       \
  X(memory_desc_create_with_tag) X(memory_desc_destroy) X(memory_desc_equal) X(memory_desc_get_size)        \
  X(memory_destroy) X(primitive_create) X(primitive_desc_destroy) X(primitive_desc_query_md)                \
  X(primitive_execute) X(reorder_primitive_desc_create) X(stream_wait) X(threadpool_interop_stream_create) \
  X(set_max_cpu_isa) X(prelu_forward_primitive_desc_create) X(prelu_backward_primitive_desc_create)      \
  X(primitive_attr_create) X(primitive_attr_set_scratchpad_mode)
#define DECLARE(name) decltype(&::dnnl_##name) name = nullptr;
  ONEDNN_FUNCTIONS(DECLARE)
#undef DECLARE

  bool Load() {
    void *handle = dlopen(ONEDNN_COPY, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (handle == nullptr) {
      std::fprintf(stderr, "cpu_ops: cannot open %s: %s\n", ONEDNN_COPY, dlerror());
      return false;
    }
#define RESOLVE(name)                                                                    \
  name = reinterpret_cast<decltype(&::dnnl_##name)>(dlsym(handle, "dnnl_" #name));       \
  if (name == nullptr) {                                                                 \
    std::fprintf(stderr, "cpu_ops: %s has no dnnl_%s\n", ONEDNN_COPY, #name);           \
    return false;                                                                        \
  }
    ONEDNN_FUNCTIONS(RESOLVE)
#undef RESOLVE
    return true;
  }
};
Api api;

int CpuCount() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
  int n = static_cast<int>(std::thread::hardware_concurrency());
  return n > 0 ? n : 1;
}

#define CHECK(call)                                                              \
  do {                                                                           \
    dnnl_status_t status_ = (call);                                              \
    if (status_ != dnnl_success) {                                               \
      std::fprintf(stderr, "cpu_ops: %s failed (status %d)\n", #call, status_); \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

enum Kind {
  kForward = 0,
  kBackwardData = 1,
  kBackwardWeights = 2,
  kPreluForward = 3,
  kPreluBackward = 4
};

// One tensor of a primitive: its plain layout, the layout the primitive runs on, and the reorder
// between them (none when they are the same).
struct Operand {
  dnnl_memory_desc_t plain = nullptr;
  const_dnnl_memory_desc_t chosen = nullptr;
  dnnl_primitive_t reorder = nullptr;
  int arg = 0;
  bool output = false;
};

struct Plan {
  dnnl_primitive_t primitive = nullptr;
  std::vector<Operand> operands;  // the inputs, then the outputs, in the functions' parameter order
  dnnl_memory_desc_t scratchpad = nullptr;  // the primitive's working memory, allocated per execution
};

struct State {
  dnnl_engine_t engine = nullptr;
  dnnl_stream_t stream = nullptr;
  Pool *pool = nullptr;
  // Every primitive gets its working memory from us, per execution: oneDNN's own (per calling thread,
  // kept at its largest) grew with the number of MindSpore threads that launch kernels.
  dnnl_primitive_attr_t attr = nullptr;
  std::map<std::array<int64_t, 10>, Plan> plans;  // per kind and shapes
  std::mutex mutex;  // one primitive at a time: they share the pool
};

State *Global() {
  static State *state = [] {
    auto *s = new State();
    s->pool = new Pool(CpuCount());
    // The limit can only be set before the copy's first primitive; built with -z nodelete, this runs once.
    auto *pool = static_cast<dnnl::threadpool_interop::threadpool_iface *>(s->pool);
    if (!api.Load() || api.set_max_cpu_isa(ONEDNN_ISA) != dnnl_success ||
        api.primitive_attr_create(&s->attr) != dnnl_success ||
        api.primitive_attr_set_scratchpad_mode(s->attr, dnnl_scratchpad_mode_user) != dnnl_success ||
        api.engine_create(&s->engine, dnnl_cpu, 0) != dnnl_success ||
        api.threadpool_interop_stream_create(&s->stream, s->engine, pool) != dnnl_success) {
      s->engine = nullptr;
    }
    return s;
  }();
  return state;
}

// Appends to plan->operands the operand `arg` of `pd`, whose plain layout is NCHW / OIHW with `dims`
int MakeOperand(State *s, const_dnnl_primitive_desc_t pd, dnnl_query_t query, const dnnl_dims_t dims, int arg,
                bool output, Plan *plan) {
  plan->operands.emplace_back();
  Operand *op = &plan->operands.back();
  op->arg = arg;
  op->output = output;
  CHECK(api.memory_desc_create_with_tag(&op->plain, 4, dims, dnnl_f32, dnnl_abcd));
  op->chosen = api.primitive_desc_query_md(pd, query, 0);
  if (op->chosen == nullptr) {
    std::fprintf(stderr, "cpu_ops: the primitive has no memory descriptor for argument %d\n", arg);
    return 1;
  }
  if (api.memory_desc_equal(op->plain, op->chosen)) return 0;
  dnnl_primitive_desc_t reorder_pd;
  const_dnnl_memory_desc_t from = output ? op->chosen : op->plain, to = output ? op->plain : op->chosen;
  CHECK(api.reorder_primitive_desc_create(&reorder_pd, from, s->engine, to, s->engine, nullptr));
  dnnl_status_t status = api.primitive_create(&op->reorder, reorder_pd);
  api.primitive_desc_destroy(reorder_pd);
  CHECK(status);
  return 0;
}

// Creates the plan's primitive from `pd` and keeps what outlives `pd`: its scratchpad and the operands'
// chosen layouts.
int Finish(const_dnnl_primitive_desc_t pd, Plan *plan) {
  CHECK(api.primitive_create(&plan->primitive, pd));
  const_dnnl_memory_desc_t scratchpad = api.primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
  if (scratchpad != nullptr) CHECK(api.memory_desc_clone(&plan->scratchpad, scratchpad));
  for (auto &op : plan->operands) {
    dnnl_memory_desc_t copy = nullptr;
    if (op.chosen != nullptr) CHECK(api.memory_desc_clone(&copy, op.chosen));
    op.chosen = copy;
  }
  return 0;
}

// dims: x (N, C, H, W), w (O, C, K, K), y (N, O, OH, OW).
int Build(State *s, Kind kind, const dnnl_dims_t x, const dnnl_dims_t w, const dnnl_dims_t y, int64_t stride,
          int64_t pad, Plan *plan) {
  dnnl_memory_desc_t any_x, any_w, any_y;
  CHECK(api.memory_desc_create_with_tag(&any_x, 4, x, dnnl_f32, dnnl_format_tag_any));
  CHECK(api.memory_desc_create_with_tag(&any_w, 4, w, dnnl_f32, dnnl_format_tag_any));
  CHECK(api.memory_desc_create_with_tag(&any_y, 4, y, dnnl_f32, dnnl_format_tag_any));
  dnnl_dims_t strides = {stride, stride}, dilates = {0, 0}, padding = {pad, pad};
  dnnl_primitive_desc_t forward = nullptr, pd = nullptr;
  int failed = 0;
  if (api.convolution_forward_primitive_desc_create(&forward, s->engine, dnnl_forward_training,
                                                     dnnl_convolution_direct, any_x, any_w, nullptr, any_y, strides,
                                                     dilates, padding, padding, s->attr) != dnnl_success) {
    failed = 1;
  } else if (kind == kForward) {
    pd = forward;
    forward = nullptr;
    failed = MakeOperand(s, pd, dnnl_query_src_md, x, DNNL_ARG_SRC, false, plan) ||
             MakeOperand(s, pd, dnnl_query_weights_md, w, DNNL_ARG_WEIGHTS, false, plan) ||
             MakeOperand(s, pd, dnnl_query_dst_md, y, DNNL_ARG_DST, true, plan);
  } else if (kind == kBackwardData) {
    failed = api.convolution_backward_data_primitive_desc_create(&pd, s->engine, dnnl_convolution_direct, any_x,
                                                                  any_w, any_y, strides, dilates, padding, padding,
                                                                  forward, s->attr) != dnnl_success ||
             MakeOperand(s, pd, dnnl_query_diff_dst_md, y, DNNL_ARG_DIFF_DST, false, plan) ||
             MakeOperand(s, pd, dnnl_query_weights_md, w, DNNL_ARG_WEIGHTS, false, plan) ||
             MakeOperand(s, pd, dnnl_query_diff_src_md, x, DNNL_ARG_DIFF_SRC, true, plan);
  } else {
    failed = api.convolution_backward_weights_primitive_desc_create(&pd, s->engine, dnnl_convolution_direct, any_x,
                                                                     any_w, nullptr, any_y, strides, dilates, padding,
                                                                     padding, forward, s->attr) != dnnl_success ||
             MakeOperand(s, pd, dnnl_query_diff_dst_md, y, DNNL_ARG_DIFF_DST, false, plan) ||
             MakeOperand(s, pd, dnnl_query_src_md, x, DNNL_ARG_SRC, false, plan) ||
             MakeOperand(s, pd, dnnl_query_diff_weights_md, w, DNNL_ARG_DIFF_WEIGHTS, true, plan);
  }
  if (!failed) failed = Finish(pd, plan);
  if (forward) api.primitive_desc_destroy(forward);
  if (pd) api.primitive_desc_destroy(pd);
  api.memory_desc_destroy(any_x);
  api.memory_desc_destroy(any_w);
  api.memory_desc_destroy(any_y);
  if (failed) std::fprintf(stderr, "cpu_ops: oneDNN has no convolution for these shapes\n");
  return failed;
}

// buffers: the operands' plain data in the Plan's order.
int Execute(State *s, Plan *plan, const std::vector<void *> &buffers) {
  const size_t n = plan->operands.size();
  std::vector<dnnl_memory_t> user(n, nullptr), inner(n, nullptr);
  std::vector<void *> scratch(n, nullptr);
  std::vector<dnnl_exec_arg_t> args(n);
  int failed = buffers.size() != n;
  for (size_t i = 0; i < n && !failed; ++i) {
    Operand &op = plan->operands[i];
    failed |= api.memory_create(&user[i], op.plain, s->engine, buffers[i]) != dnnl_success;
    inner[i] = user[i];
    if (op.reorder == nullptr || failed) continue;
    size_t size = (api.memory_desc_get_size(op.chosen) + 63) / 64 * 64;
    scratch[i] = std::aligned_alloc(64, size);
    failed |= scratch[i] == nullptr ||
              api.memory_create(&inner[i], op.chosen, s->engine, scratch[i]) != dnnl_success;
    if (!failed && !op.output) {
      dnnl_exec_arg_t reorder_args[2] = {{DNNL_ARG_FROM, user[i]}, {DNNL_ARG_TO, inner[i]}};
      failed |= api.primitive_execute(op.reorder, s->stream, 2, reorder_args) != dnnl_success;
    }
  }
  void *work = nullptr;
  dnnl_memory_t work_memory = nullptr;
  if (!failed) {
    for (size_t i = 0; i < n; ++i) args[i] = {plan->operands[i].arg, inner[i]};
    const size_t work_size =
        plan->scratchpad == nullptr ? 0 : (api.memory_desc_get_size(plan->scratchpad) + 63) / 64 * 64;
    if (work_size > 0) {
      work = std::aligned_alloc(64, work_size);
      failed |= work == nullptr ||
                api.memory_create(&work_memory, plan->scratchpad, s->engine, work) != dnnl_success;
      args.push_back({DNNL_ARG_SCRATCHPAD, work_memory});
    }
  }
  if (!failed) {
    failed |= api.primitive_execute(plan->primitive, s->stream, static_cast<int>(args.size()), args.data()) !=
               dnnl_success;
  }
  for (size_t i = 0; i < n && !failed; ++i) {
    Operand &op = plan->operands[i];
    if (!op.output || op.reorder == nullptr) continue;
    dnnl_exec_arg_t reorder_args[2] = {{DNNL_ARG_FROM, inner[i]}, {DNNL_ARG_TO, user[i]}};
    failed |= api.primitive_execute(op.reorder, s->stream, 2, reorder_args) != dnnl_success;
  }
  failed |= api.stream_wait(s->stream) != dnnl_success;
  if (work_memory != nullptr) api.memory_destroy(work_memory);
  std::free(work);
  for (size_t i = 0; i < n; ++i) {
    if (inner[i] != nullptr && inner[i] != user[i]) api.memory_destroy(inner[i]);
    if (user[i] != nullptr) api.memory_destroy(user[i]);
    std::free(scratch[i]);
  }
  if (failed) std::fprintf(stderr, "cpu_ops: executing a oneDNN primitive failed\n");
  return failed;
}

// The stride that maps `in` to `out` with kernel k and padding p, or 0.
int64_t StrideOf(int64_t in, int64_t out, int64_t k, int64_t p) {
  for (int64_t s = 1; s <= 8; ++s) {
    if (in + 2 * p >= k && (in + 2 * p - k) / s + 1 == out) return s;
  }
  return 0;
}

// Executes the plan for `key`, built by `build` the first time.
int WithPlan(const std::array<int64_t, 10> &key, const std::vector<void *> &buffers,
             const std::function<int(State *, Plan *)> &build) {
  State *s = Global();
  if (s->engine == nullptr) {
    std::fprintf(stderr, "cpu_ops: oneDNN could not be set up\n");
    return 1;
  }
  std::lock_guard<std::mutex> lock(s->mutex);
  auto found = s->plans.find(key);
  if (found == s->plans.end()) {
    Plan plan;
    if (build(s, &plan)) return 1;
    found = s->plans.emplace(key, plan).first;
  }
  return Execute(s, &found->second, buffers);
}

// x, w, y: the shapes (N, C, H, W), (O, C, K, K), (N, O, OH, OW); buffers in the Plan's operand order.
int RunConv(Kind kind, int nparam, int *ndims, const char **dtypes, const int64_t *x, const int64_t *w,
        const int64_t *y, const std::vector<void *> &buffers) {
  for (int i = 0; i < nparam; ++i) {
    if (ndims[i] != 4 || std::strcmp(dtypes[i], "float32") != 0) {
      std::fprintf(stderr, "cpu_ops: float32 NCHW tensors only\n");
      return 1;
    }
  }
  const int64_t k = w[2], pad = (k - 1) / 2;
  const int64_t stride = StrideOf(x[2], y[2], k, pad);
  if (k % 2 == 0 || w[3] != k || x[1] != w[1] || y[1] != w[0] || x[0] != y[0] || stride == 0 ||
      StrideOf(x[3], y[3], k, pad) != stride) {
    std::fprintf(stderr, "cpu_ops: shapes are not those of one odd-kernel convolution with padding (k-1)/2\n");
    return 1;
  }
  dnnl_dims_t dx = {x[0], x[1], x[2], x[3]}, dw = {w[0], w[1], w[2], w[3]}, dy = {y[0], y[1], y[2], y[3]};
  return WithPlan({kind, x[0], x[1], x[2], x[3], w[0], k, y[2], y[3], stride}, buffers,
                  [&](State *s, Plan *plan) { return Build(s, kind, dx, dw, dy, stride, pad, plan); });
}

// PReLU on plain NCHW x with one slope per channel, forward (operands x, w, y) or backward (operands
// x, w, dy, then dx, dw). Plain layouts: the tensors around it are plain, and oneDNN's PReLU kernels
// take them as they are.
int BuildPrelu(State *s, Kind kind, const dnnl_dims_t x, Plan *plan) {
  dnnl_dims_t w = {1, x[1], 1, 1};
  dnnl_memory_desc_t xd, wd;
  CHECK(api.memory_desc_create_with_tag(&xd, 4, x, dnnl_f32, dnnl_abcd));
  CHECK(api.memory_desc_create_with_tag(&wd, 4, w, dnnl_f32, dnnl_abcd));
  dnnl_primitive_desc_t forward = nullptr, pd = nullptr;
  int failed = api.prelu_forward_primitive_desc_create(&forward, s->engine, dnnl_forward_training, xd, wd, xd,
                                                       s->attr) != dnnl_success;
  if (!failed && kind == kPreluForward) {
    pd = forward;
    forward = nullptr;
    failed = MakeOperand(s, pd, dnnl_query_src_md, x, DNNL_ARG_SRC, false, plan) ||
             MakeOperand(s, pd, dnnl_query_weights_md, w, DNNL_ARG_WEIGHTS, false, plan) ||
             MakeOperand(s, pd, dnnl_query_dst_md, x, DNNL_ARG_DST, true, plan);
  } else if (!failed) {
    failed = api.prelu_backward_primitive_desc_create(&pd, s->engine, xd, wd, xd, wd, xd, forward, s->attr) !=
                 dnnl_success ||
             MakeOperand(s, pd, dnnl_query_src_md, x, DNNL_ARG_SRC, false, plan) ||
             MakeOperand(s, pd, dnnl_query_weights_md, w, DNNL_ARG_WEIGHTS, false, plan) ||
             MakeOperand(s, pd, dnnl_query_diff_dst_md, x, DNNL_ARG_DIFF_DST, false, plan) ||
             MakeOperand(s, pd, dnnl_query_diff_src_md, x, DNNL_ARG_DIFF_SRC, true, plan) ||
             MakeOperand(s, pd, dnnl_query_diff_weights_md, w, DNNL_ARG_DIFF_WEIGHTS, true, plan);
  }
  if (!failed) failed = Finish(pd, plan);
  if (forward) api.primitive_desc_destroy(forward);
  if (pd) api.primitive_desc_destroy(pd);
  api.memory_desc_destroy(xd);
  api.memory_desc_destroy(wd);
  if (failed) std::fprintf(stderr, "cpu_ops: oneDNN has no PReLU for these shapes\n");
  return failed;
}

// x: (N, C, H, W), w: (C,); the other tensors have x's or w's shape.
int RunPrelu(Kind kind, int nparam, int *ndims, int64_t **shapes, const char **dtypes,
             const std::vector<void *> &buffers) {
  const int64_t *x = shapes[0];
  for (int i = 0; i < nparam; ++i) {
    const bool slope = i == 1 || (kind == kPreluBackward && i == 4);
    if (std::strcmp(dtypes[i], "float32") != 0 || ndims[i] != (slope ? 1 : 4) ||
        (slope ? shapes[i][0] != x[1] : std::memcmp(shapes[i], x, 4 * sizeof(int64_t)) != 0)) {
      std::fprintf(stderr, "cpu_ops: PReLU takes float32 x (N, C, H, W) and slopes (C,)\n");
      return 1;
    }
  }
  dnnl_dims_t dims = {x[0], x[1], x[2], x[3]};
  return WithPlan({kind, x[0], x[1], x[2], x[3], 0, 0, 0, 0, 0}, buffers,
                  [&](State *s, Plan *plan) { return BuildPrelu(s, kind, dims, plan); });
}

// Batch normalization of NCHW x over (N, H, W), one channel per task of the pool. Written here rather
// than taken from oneDNN: its kernel for plain layouts (MindSpore's BatchNorm runs it too) took about
// twice as long forward and backward as these loops, which read each tensor the fewest times the
// arithmetic allows (forward: x three times, y written once; backward: x and dy twice, dx written once).
// Sums run in float lanes per (n, c) plane and add up in double.
struct Planes {
  int64_t n, c, hw;
  const float *At(const float *base, int64_t i, int64_t channel) const { return base + (i * c + channel) * hw; }
  float *At(float *base, int64_t i, int64_t channel) const { return base + (i * c + channel) * hw; }
};

constexpr int kLanes = 16;

// The sums over one channel of f(a[k], b[k]) and g(a[k], b[k]), in one pass (b may be null).
template <typename F, typename G>
std::array<double, 2> ChannelSums(const Planes &p, const float *a, const float *b, int64_t channel, F f, G g) {
  std::array<double, 2> total = {0.0, 0.0};
  for (int64_t i = 0; i < p.n; ++i) {
    const float *pa = p.At(a, i, channel), *pb = b ? p.At(b, i, channel) : pa;
    float first[kLanes] = {0.0f}, second[kLanes] = {0.0f};
    int64_t k = 0;
    for (; k + kLanes <= p.hw; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        first[j] += f(pa[k + j], pb[k + j]);
        second[j] += g(pa[k + j], pb[k + j]);
      }
    }
    for (; k < p.hw; ++k) {
      first[0] += f(pa[k], pb[k]);
      second[0] += g(pa[k], pb[k]);
    }
    for (int j = 0; j < kLanes; ++j) {
      total[0] += first[j];
      total[1] += second[j];
    }
  }
  return total;
}

template <typename F>
double ChannelSum(const Planes &p, const float *a, const float *b, int64_t channel, F f) {
  return ChannelSums(p, a, b, channel, f, [](float, float) { return 0.0f; })[0];
}

// Runs body(channel) for every channel on the pool, one operator at a time.
int ForEachChannel(int64_t channels, const std::function<void(int64_t)> &body) {
  State *s = Global();
  if (s->engine == nullptr) {
    std::fprintf(stderr, "cpu_ops: the thread pool could not be set up\n");
    return 1;
  }
  std::lock_guard<std::mutex> lock(s->mutex);
  s->pool->parallel_for(static_cast<int>(channels), [&](int channel, int) { body(channel); });
  return 0;
}

// Checks that tensor i is float32 with x's shape (N, C, H, W) (role 'x'), (C,) (role 'c') or (2,)
// (role 'p': epsilon and momentum), for the roles in `layout`.
int CheckShapes(int nparam, int *ndims, int64_t **shapes, const char **dtypes, const char *layout) {
  const int64_t *x = shapes[0];
  for (int i = 0; i < nparam; ++i) {
    const char role = layout[i];
    const bool ok = std::strcmp(dtypes[i], "float32") == 0 &&
                    (role == 'x'   ? ndims[i] == 4 && std::memcmp(shapes[i], x, 4 * sizeof(int64_t)) == 0
                     : role == 'c' ? ndims[i] == 1 && shapes[i][0] == x[1]
                                   : ndims[i] == 1 && shapes[i][0] == 2);
    if (!ok) {
      std::fprintf(stderr, "cpu_ops: tensor %d is not a float32 (N, C, H, W) like x, a per-channel vector (C,) or "
                           "(epsilon, momentum)\n", i);
      return 1;
    }
  }
  if (x[0] * x[2] * x[3] < 1 || x[1] > (int64_t{1} << 30)) {
    std::fprintf(stderr, "cpu_ops: an empty batch or too many channels\n");
    return 1;
  }
  return 0;
}

int WrongCount(int got, int expected) {
  std::fprintf(stderr, "cpu_ops: %d tensors instead of %d\n", got, expected);
  return 1;
}

// dx of PReLU(x, w): params x (N, C, H, W), w (C,), dy, dx. oneDNN computes dw too; it goes to a
// temporary buffer (src/models/iresnet.py takes dw from MindSpore's kernels: with an operator of ours
// for it, MindSpore's r50 step peaked 0.7 GB higher).
int PreluInputGradient(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 4) return WrongCount(nparam, 4);
  std::vector<float> dw(static_cast<size_t>(shapes[1][0]));
  int all_ndims[5] = {ndims[0], ndims[1], ndims[2], ndims[3], ndims[1]};
  int64_t *all_shapes[5] = {shapes[0], shapes[1], shapes[2], shapes[3], shapes[1]};
  const char *all_dtypes[5] = {dtypes[0], dtypes[1], dtypes[2], dtypes[3], dtypes[1]};
  return RunPrelu(kPreluBackward, 5, all_ndims, all_shapes, all_dtypes,
                  {params[0], params[1], params[2], params[3], dw.data()});
}

}  // namespace

// y = conv(x, w): params x, w, y.
extern "C" int ConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  if (nparam != 3) return WrongCount(nparam, 3);
  return RunConv(kForward, nparam, ndims, dtypes, shapes[0], shapes[1], shapes[2], {params[0], params[1], params[2]});
}

// dx, the gradient of conv(x, w) with respect to x: params dy, w, x (for its shape only), dx.
extern "C" int ConvBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                void *) {
  if (nparam != 4) return WrongCount(nparam, 4);
  return RunConv(kBackwardData, nparam, ndims, dtypes, shapes[2], shapes[1], shapes[0], {params[0], params[1], params[3]});
}

// dw, the gradient of conv(x, w) with respect to w: params dy, x, w (for its shape only), dw.
extern "C" int ConvBackwardWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  if (nparam != 4) return WrongCount(nparam, 4);
  return RunConv(kBackwardWeights, nparam, ndims, dtypes, shapes[1], shapes[2], shapes[0],
             {params[0], params[1], params[3]});
}

// y = PReLU(x, w): params x (N, C, H, W), w (C,), y.
extern "C" int PreluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  if (nparam != 3) return WrongCount(nparam, 3);
  return RunPrelu(kPreluForward, nparam, ndims, shapes, dtypes, {params[0], params[1], params[2]});
}

// dw of PReLU(x, w): params x (N, C, H, W), dy, dw (C,): the sum over batch and space of dy x where x <= 0,
// one pass over x and dy (the element-wise form took three and two temporaries of x's size). The
// select is written so that it compiles without a branch (on random signs a branch mispredicts often).
extern "C" int PreluWeightGradient(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *, void *) {
  if (nparam != 3) return WrongCount(nparam, 3);
  if (CheckShapes(nparam, ndims, shapes, dtypes, "xxc")) return 1;
  const Planes p{shapes[0][0], shapes[0][1], shapes[0][2] * shapes[0][3]};
  const auto *x = static_cast<const float *>(params[0]), *dy = static_cast<const float *>(params[1]);
  auto *dw = static_cast<float *>(params[2]);
  return ForEachChannel(p.c, [&](int64_t c) {
    dw[c] = static_cast<float>(ChannelSum(p, x, dy, c, [](float a, float g) { return (a < 0.0f ? a : 0.0f) * g; }));
  });
}

// dx of PReLU(x, w): params x, w, dy, dx.
extern "C" int PreluBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                 void *) {
  return PreluInputGradient(nparam, params, ndims, shapes, dtypes);
}

// 1 when the private oneDNN opened and its engine and stream exist: src/models/cpu_ops.py asks before
// MindSpore loads these operators, so a failure falls back to MindSpore's kernels instead of stopping.
extern "C" int CpuOpsReady() { return Global()->engine != nullptr; }

// Batch normalization in training, with the moving statistics' update: params x (N, C, H, W), scale (C,),
// shift (C,), moving mean (C,), moving variance (C,), (epsilon, momentum) (2,), then the outputs y, the
// batch's mean and biased variance (C,) (what the backward pass takes), the new moving mean and variance
// (C,): moving = (1 - momentum) moving + momentum batch, with the batch's unbiased variance (MindSpore's
// BatchNorm: momentum is the batch's weight). One value per channel counts as unbiased variance 0, where
// MindSpore's BatchNorm makes the moving variance NaN.
extern "C" int BatchNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                void *) {
  if (nparam != 11) return WrongCount(nparam, 11);
  if (CheckShapes(nparam, ndims, shapes, dtypes, "xccccpxcccc")) return 1;
  const float epsilon = static_cast<const float *>(params[5])[0], momentum = static_cast<const float *>(params[5])[1];
  if (!(epsilon > 0.0f) || !(momentum >= 0.0f && momentum <= 1.0f)) {
    std::fprintf(stderr, "cpu_ops: batch normalization needs epsilon > 0 and momentum in [0, 1]\n");
    return 1;
  }
  const Planes p{shapes[0][0], shapes[0][1], shapes[0][2] * shapes[0][3]};
  const auto *x = static_cast<const float *>(params[0]), *scale = static_cast<const float *>(params[1]),
             *shift = static_cast<const float *>(params[2]), *moving_mean = static_cast<const float *>(params[3]),
             *moving_variance = static_cast<const float *>(params[4]);
  auto *y = static_cast<float *>(params[6]), *mean = static_cast<float *>(params[7]),
       *variance = static_cast<float *>(params[8]), *new_mean = static_cast<float *>(params[9]),
       *new_variance = static_cast<float *>(params[10]);
  const double count = static_cast<double>(p.n * p.hw);
  return ForEachChannel(p.c, [&](int64_t c) {
    const float m = static_cast<float>(ChannelSum(p, x, nullptr, c, [](float a, float) { return a; }) / count);
    const double squares = ChannelSum(p, x, nullptr, c, [m](float a, float) { return (a - m) * (a - m); });
    const float v = static_cast<float>(squares / count);
    mean[c] = m;
    variance[c] = v;
    new_mean[c] = (1.0f - momentum) * moving_mean[c] + momentum * m;
    new_variance[c] = (1.0f - momentum) * moving_variance[c] +
                      momentum * static_cast<float>(count > 1.0 ? squares / (count - 1.0) : 0.0);
    // y = scale (x - m) / sqrt(v + eps) + shift = a x + b
    const float a = scale[c] / std::sqrt(v + epsilon), b = shift[c] - a * m;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *in = p.At(x, i, c);
      float *out = p.At(y, i, c);
      for (int64_t k = 0; k < p.hw; ++k) out[k] = a * in[k] + b;
    }
  });
}

// The gradients of batch normalization in training: params x, scale, mean, variance (the forward's
// batch statistics), dy, (epsilon, momentum), then the outputs dx, dscale, dshift.
extern "C" int BatchNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                                 void *) {
  if (nparam != 9) return WrongCount(nparam, 9);
  if (CheckShapes(nparam, ndims, shapes, dtypes, "xcccxpxcc")) return 1;
  const float epsilon = static_cast<const float *>(params[5])[0];
  const Planes p{shapes[0][0], shapes[0][1], shapes[0][2] * shapes[0][3]};
  const auto *x = static_cast<const float *>(params[0]), *scale = static_cast<const float *>(params[1]),
             *mean = static_cast<const float *>(params[2]), *variance = static_cast<const float *>(params[3]),
             *dy = static_cast<const float *>(params[4]);
  auto *dx = static_cast<float *>(params[6]), *dscale = static_cast<float *>(params[7]),
       *dshift = static_cast<float *>(params[8]);
  const double count = static_cast<double>(p.n * p.hw);
  return ForEachChannel(p.c, [&](int64_t c) {
    const float m = mean[c], inv_std = 1.0f / std::sqrt(variance[c] + epsilon);
    const auto sums = ChannelSums(
        p, dy, x, c, [](float g, float) { return g; }, [m](float g, float a) { return g * (a - m); });
    const double sum_dy = sums[0], sum_dy_centered = sums[1];
    dshift[c] = static_cast<float>(sum_dy);
    dscale[c] = static_cast<float>(sum_dy_centered) * inv_std;
    // dx = scale inv_std (dy - mean(dy) - (x - m) inv_std^2 mean(dy (x - m))) = a dy + b x + k
    const float a = scale[c] * inv_std;
    const float b = static_cast<float>(-a * inv_std * inv_std * sum_dy_centered / count);
    const float k = static_cast<float>(-a * sum_dy / count) - b * m;
    for (int64_t i = 0; i < p.n; ++i) {
      const float *g = p.At(dy, i, c), *in = p.At(x, i, c);
      float *out = p.At(dx, i, c);
      for (int64_t j = 0; j < p.hw; ++j) out[j] = a * g[j] + b * in[j] + k;
    }
  });
}
