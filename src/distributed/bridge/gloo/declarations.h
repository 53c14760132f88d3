// The PyPI wheel of PyTorch ships c10d's headers but not Gloo's. ProcessGroupGloo.hpp, which c10d.cpp needs for
// the size and constructor of c10d::ProcessGroupGloo, holds every Gloo object by pointer and never calls Gloo in
// its inline code except through its own GlooStore adapter and setTimeout. These declarations are just enough to compile that
// header: the bridge never calls Gloo itself, it drives the process group through c10d's Backend interface, whose
// code lives in libtorch_cpu together with the real Gloo.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {
// Named by ProcessGroupGloo::setTimeout's inline body, which the bridge never calls.
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
namespace rendezvous {
// The interface ProcessGroupGloo::GlooStore overrides (set, get, and wait with and without a timeout).
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
} // namespace rendezvous
} // namespace gloo
