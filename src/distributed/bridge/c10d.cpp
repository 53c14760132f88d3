// distill's bridge to PyTorch's c10d (src/distributed/mod.rs is its Rust side): a TCPStore for the rendezvous and
// a Gloo process group, with the four collectives data-parallel training needs, on the tensors tch hands over
// (tch's C_tensor is a heap-allocated at::Tensor). Every function catches whatever c10d throws and returns the
// message as a malloc'd string (NULL on success), so that no C++ exception crosses into Rust.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

struct distill_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct distill_group {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

namespace {

char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}

template <class F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("an unknown C++ exception in c10d");
  }
}

// While a rendezvous connects, c10d logs every failed try, with a C++ stack trace, to stderr; the error that ends
// it comes back to Rust and says the same once. So c10 logging is raised to FATAL for the duration (unless the user
// asked for c10's logs with TORCH_CPP_LOG_LEVEL), counted so that ranks in threads of one process restore it once.
class QuietC10Logs {
 public:
  QuietC10Logs() : active_(std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) {
    if (!active_) return;
    std::lock_guard<std::mutex> lock(mutex());
    if (depth()++ == 0) {
      saved() = FLAGS_caffe2_log_level;
      FLAGS_caffe2_log_level = 3;
    }
  }
  ~QuietC10Logs() {
    if (!active_) return;
    std::lock_guard<std::mutex> lock(mutex());
    if (--depth() == 0) FLAGS_caffe2_log_level = saved();
  }
  QuietC10Logs(const QuietC10Logs&) = delete;
  QuietC10Logs& operator=(const QuietC10Logs&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static int& depth() {
    static int d = 0;
    return d;
  }
  static int& saved() {
    static int s = 0;
    return s;
  }
  bool active_;
};

const at::Tensor& tensor(const void* t) {
  return *static_cast<const at::Tensor*>(t);
}

// Waits for a collective and rethrows its error; a wait that runs out of time throws too.
void finish(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    std::ostringstream message;
    message << "the collective did not complete within " << timeout.count() << " ms";
    throw std::runtime_error(message.str());
  }
}

void sum_across(distill_group* group, at::Tensor& t) {
  std::vector<at::Tensor> tensors{t};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
  options.timeout = group->timeout;
  finish(group->backend->allreduce(tensors, options), group->timeout);
}

// Batch normalization over the samples of every rank (PyTorch's SyncBatchNorm): the forward pass sums each
// channel's count, sum and centred sum of squares across ranks (in float64, one all-reduce) and normalizes with
// the global mean and biased variance; the backward pass sums the two reductions the input's gradient needs
// (Σ dy and Σ dy·x̂), so each rank's input gradient is the one a single process with every rank's samples would
// compute for its own samples. The weight's and bias's gradients stay local: data-parallel training averages them
// afterwards, as DDP does. Every rank runs the same collectives in the same order, also when a gradient is not
// needed, so that no rank waits on another.
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static std::vector<int64_t> reduced_dims(const at::Tensor& x) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    return dims;
  }

  static std::vector<int64_t> channel_shape(const at::Tensor& x) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[1] = x.size(1);
    return shape;
  }

  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      const at::Tensor& bias,
      at::Tensor running_mean,
      at::Tensor running_var,
      double momentum,
      double eps,
      int64_t group_address) {
    auto* group = reinterpret_cast<distill_group*>(group_address);
    auto dims = reduced_dims(input);
    auto shape = channel_shape(input);
    const int64_t channels = input.size(1);
    const double local_n = static_cast<double>(input.numel() / std::max<int64_t>(channels, 1));
    auto local_mean = input.mean(dims).to(at::kDouble);
    auto centred = input.to(at::kDouble) - local_mean.view(shape);
    auto local_m2 = (centred * centred).sum(dims);
    auto stats = at::cat({local_mean * local_n, local_m2 + local_mean * local_mean * local_n, at::full({1}, local_n, local_mean.options())});
    sum_across(group, stats);
    const double n = stats[2 * channels].item<double>();
    auto mean = stats.narrow(0, 0, channels) / n;
    auto var = (stats.narrow(0, channels, channels) / n - mean * mean).clamp_min(0.0);
    auto invstd = (var + eps).rsqrt();
    {
      at::NoGradGuard no_grad;
      running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()) * momentum);
      auto unbiased = n > 1.0 ? var * (n / (n - 1.0)) : var;
      running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()) * momentum);
    }
    auto mean_t = mean.to(input.scalar_type());
    auto invstd_t = invstd.to(input.scalar_type());
    auto out = (input - mean_t.view(shape)) * (invstd_t * weight).view(shape) + bias.view(shape);
    ctx->save_for_backward({input, weight, mean_t, invstd_t});
    ctx->saved_data["n"] = n;
    ctx->saved_data["group"] = group_address;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto& weight = saved[1];
    const auto& mean = saved[2];
    const auto& invstd = saved[3];
    const double n = ctx->saved_data["n"].toDouble();
    auto* group = reinterpret_cast<distill_group*>(ctx->saved_data["group"].toInt());
    auto dims = reduced_dims(input);
    auto shape = channel_shape(input);
    const int64_t channels = input.size(1);
    auto dy = grads[0].defined() ? grads[0] : at::zeros_like(input);
    auto xhat = (input - mean.view(shape)) * invstd.view(shape);
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xhat = (dy * xhat).sum(dims);
    auto both = at::cat({sum_dy, sum_dy_xhat}).to(at::kDouble);
    sum_across(group, both);
    auto mean_dy = (both.narrow(0, 0, channels) / n).to(input.scalar_type());
    auto mean_dy_xhat = (both.narrow(0, channels, channels) / n).to(input.scalar_type());
    auto grad_input = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * (weight * invstd).view(shape);
    return {grad_input, sum_dy_xhat, sum_dy, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

} // namespace

extern "C" {

// Synchronized batch normalization in training mode (see SyncBatchNorm above); *out receives a new tensor.
char* distill_c10d_sync_batch_norm(
    distill_group* group,
    void* input,
    void* weight,
    void* bias,
    void* running_mean,
    void* running_var,
    double momentum,
    double eps,
    void** out) {
  return guarded([&] {
    at::Tensor y = SyncBatchNorm::apply(
        tensor(input), tensor(weight), tensor(bias), tensor(running_mean), tensor(running_var), momentum, eps,
        reinterpret_cast<int64_t>(group));
    *out = new at::Tensor(std::move(y));
  });
}

void distill_c10d_free_message(char* message) {
  std::free(message);
}

char* distill_c10d_tcp_store(
    const char* host,
    uint16_t port,
    int32_t world_size,
    int32_t is_server,
    int32_t listen_fd,
    int64_t timeout_ms,
    distill_store** out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server != 0;
    // A socket the launcher bound and listens on: the server uses it, so the port was never free in between.
    if (is_server != 0 && listen_fd >= 0) options.masterListenFd = listen_fd;
    options.numWorkers = static_cast<std::size_t>(world_size);
    options.waitWorkers = true;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    QuietC10Logs quiet;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    *out = new distill_store{store};
  });
}

void distill_c10d_free_store(distill_store* store) {
  delete store;
}

// Adds value to the counter at key (created at 0) and returns the sum: a rendezvous check that each rank joins once.
char* distill_c10d_store_add(distill_store* store, const char* key, int64_t value, int64_t* out) {
  return guarded([&] { *out = store->store->add(key, value); });
}

// Sets key to an 8-byte little-endian integer.
char* distill_c10d_store_set_i64(distill_store* store, const char* key, int64_t value) {
  return guarded([&] {
    std::vector<uint8_t> bytes(8);
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(static_cast<uint64_t>(value) >> (8 * i));
    store->store->set(key, bytes);
  });
}

// Reads the integer at key, waiting for it up to the store's timeout.
char* distill_c10d_store_get_i64(distill_store* store, const char* key, int64_t* out) {
  return guarded([&] {
    std::vector<uint8_t> bytes = store->store->get(key);
    if (bytes.size() != 8) throw std::runtime_error(std::string("the store's value at ") + key + " is not an 8-byte integer");
    uint64_t value = 0;
    for (int i = 0; i < 8; ++i) value |= static_cast<uint64_t>(bytes[i]) << (8 * i);
    *out = static_cast<int64_t>(value);
  });
}

char* distill_c10d_gloo_group(
    distill_store* store,
    int32_t rank,
    int32_t size,
    int64_t timeout_ms,
    distill_group** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    // As torch.distributed does: the interfaces named by GLOO_SOCKET_IFNAME, otherwise this host's address (or the
    // loopback device when the hostname does not resolve).
    const char* interfaces = std::getenv("GLOO_SOCKET_IFNAME");
    if (interfaces != nullptr && *interfaces != '\0') {
      std::stringstream names(interfaces);
      std::string name;
      while (std::getline(names, name, ',')) {
        if (!name.empty()) options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      }
    }
    if (options->devices.empty()) options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    QuietC10Logs quiet;
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store->store, rank, size, options);
    *out = new distill_group{group, timeout};
  });
}

void distill_c10d_free_group(distill_group* group) {
  delete group;
}

// op: 0 sum, 1 product, 2 min, 3 max.
char* distill_c10d_all_reduce(distill_group* group, void* t, int32_t op) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{tensor(t)};
    c10d::AllreduceOptions options;
    switch (op) {
      case 0: options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM); break;
      case 1: options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::PRODUCT); break;
      case 2: options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::MIN); break;
      case 3: options.reduceOp = c10d::ReduceOp(c10d::ReduceOp::MAX); break;
      default: throw std::invalid_argument("unknown reduction");
    }
    options.timeout = group->timeout;
    finish(group->backend->allreduce(tensors, options), group->timeout);
  });
}

char* distill_c10d_broadcast(distill_group* group, void* t, int32_t root) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{tensor(t)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = group->timeout;
    finish(group->backend->broadcast(tensors, options), group->timeout);
  });
}

// outputs: one tensor per rank, each shaped like input.
char* distill_c10d_all_gather(distill_group* group, void* const* outputs, size_t n, void* input) {
  return guarded([&] {
    std::vector<std::vector<at::Tensor>> out(1);
    for (size_t i = 0; i < n; ++i) out[0].push_back(tensor(outputs[i]));
    std::vector<at::Tensor> in{tensor(input)};
    c10d::AllgatherOptions options;
    options.timeout = group->timeout;
    finish(group->backend->allgather(out, in, options), group->timeout);
  });
}

char* distill_c10d_barrier(distill_group* group) {
  return guarded([&] {
    c10d::BarrierOptions options;
    options.timeout = group->timeout;
    finish(group->backend->barrier(options), group->timeout);
  });
}

} // extern "C"
