// distill's bridge to PyTorch's c10d (src/distributed/mod.rs is its Rust side): a TCPStore for the rendezvous and
// a Gloo process group, with the four collectives data-parallel training needs, on the tensors tch hands over
// (tch's C_tensor is a heap-allocated at::Tensor). Every function catches whatever c10d throws and returns the
// message as a malloc'd string (NULL on success), so that no C++ exception crosses into Rust.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
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

} // namespace

extern "C" {

void distill_c10d_free_message(char* message) {
  std::free(message);
}

char* distill_c10d_tcp_store(
    const char* host,
    uint16_t port,
    int32_t world_size,
    int32_t is_server,
    int64_t timeout_ms,
    distill_store** out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server != 0;
    options.numWorkers = static_cast<std::size_t>(world_size);
    options.waitWorkers = true;
    options.timeout = std::chrono::milliseconds(timeout_ms);
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
