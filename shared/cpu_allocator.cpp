// A caching allocator for CPU tensors of 128 KiB and more (see cpu_allocator.py for why).
//
// Blocks come from mmap in size classes (four per power of two, whole pages), and a
// freed block waits in its class's free list for the next request of that class instead
// of going back to the kernel: a training step allocates and frees the same few
// activation shapes layer after layer, so after the first layer most requests reuse
// pages that are already resident, with no page faults and no zeroing. Smaller requests
// go to c10's own CPU allocation functions.
//
// The cache holds at most the larger of 256 MiB and a quarter of the bytes in use; past
// that, the blocks freed longest ago are unmapped first, so the cache follows the shapes
// in use now (a cache full of an earlier batch's sizes would serve nothing and make every
// request a fresh mapping). `release_cached` empties it: the training loop calls it
// between batches, whose shapes differ.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kSmallest = 128 * 1024;  // requests below this go to c10::alloc_cpu

size_t size_class(size_t bytes) {
  const int top = 63 - __builtin_clzll(bytes - 1);  // 2^top < bytes <= 2^(top + 1)
  const size_t quarter = (size_t(1) << top) / 4;
  const size_t rounded = (bytes + quarter - 1) / quarter * quarter;
  return (rounded + kPage - 1) / kPage * kPage;
}

struct Pool {
  using FreeOrder = std::list<std::pair<void*, size_t>>;  // free blocks and their bytes, oldest first
  std::mutex mutex;
  std::unordered_map<void*, size_t> blocks;  // every mapped block, in use or free -> bytes
  FreeOrder free_order;
  std::unordered_map<size_t, std::deque<FreeOrder::iterator>> free_lists;  // by size class, oldest first
  bool caching = false;
  // Free bytes kept at most: the larger of a floor and a share of the bytes in use;
  // beyond that the oldest free blocks are unmapped.
  int64_t cache_floor = int64_t(256) << 20;
  double cache_share = 0.25;
  int64_t in_use = 0, cached = 0, maps = 0, reuses = 0;

  void unmap(void* ptr, size_t bytes) {
    munmap(ptr, bytes);
    blocks.erase(ptr);
  }

  void unmap_oldest_free() {
    auto [ptr, bytes] = free_order.front();
    free_lists[bytes].pop_front();  // the class's oldest is the oldest overall of its class
    free_order.pop_front();
    cached -= bytes;
    unmap(ptr, bytes);
  }
};

// Never destroyed: tensors freed while the process exits still come back here.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

void* take(size_t request) {
  Pool& p = pool();
  const size_t bytes = size_class(request);
  {
    std::lock_guard<std::mutex> guard(p.mutex);
    auto list = p.free_lists.find(bytes);
    if (list != p.free_lists.end() && !list->second.empty()) {
      void* ptr = list->second.back()->first;  // the most recently freed: likeliest still in the CPU's caches
      p.free_order.erase(list->second.back());
      list->second.pop_back();
      p.cached -= bytes;
      p.in_use += bytes;
      p.reuses += 1;
      return ptr;
    }
  }
  void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) {
    std::lock_guard<std::mutex> guard(p.mutex);
    TORCH_CHECK_WITH(OutOfMemoryError, false, "peftlab CPU allocator: mmap of ", bytes,
                     " bytes failed (in use ", p.in_use, " bytes, cached ", p.cached, ")");
  }
  std::lock_guard<std::mutex> guard(p.mutex);
  p.blocks.emplace(ptr, bytes);
  p.in_use += bytes;
  p.maps += 1;
  return ptr;
}

void give_back(void* ptr) {
  if (ptr == nullptr) {
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> guard(p.mutex);
  auto found = p.blocks.find(ptr);
  if (found == p.blocks.end()) {  // a small block
    guard.unlock();
    c10::free_cpu(ptr);
    return;
  }
  const size_t bytes = found->second;
  p.in_use -= bytes;
  if (!p.caching) {
    p.unmap(ptr, bytes);
    return;
  }
  p.cached += bytes;
  p.free_order.emplace_back(ptr, bytes);
  p.free_lists[bytes].push_back(std::prev(p.free_order.end()));
  while (p.cached > std::max(p.cache_floor, int64_t(p.cache_share * p.in_use))) {
    p.unmap_oldest_free();
  }
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override {
    void* ptr = bytes >= kSmallest ? take(bytes) : c10::alloc_cpu(bytes);
    return {ptr, ptr, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return &give_back;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCPUAllocator caching_allocator;
c10::Allocator* previous_allocator = nullptr;
constexpr uint8_t kPriority = 1;  // above c10's default (0), so SetCPUAllocator takes it

// Unmaps every free block; returns the bytes released.
int64_t release_cached() {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mutex);
  const int64_t released = p.cached;
  while (!p.free_order.empty()) {
    p.unmap_oldest_free();
  }
  return released;
}

void install() {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> guard(p.mutex);
    if (p.caching) {
      return;
    }
    p.caching = true;
  }
  previous_allocator = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&caching_allocator, kPriority);
}

// New tensors come from the previous allocator again; blocks still in use come back
// here when freed and are unmapped then.
void uninstall() {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> guard(p.mutex);
    if (!p.caching) {
      return;
    }
    p.caching = false;
  }
  c10::SetCPUAllocator(previous_allocator, kPriority);
  release_cached();
}

std::vector<int64_t> stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mutex);
  return {p.in_use, p.cached, p.maps, p.reuses};
}

bool active() {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mutex);
  return p.caching;
}

void set_cache_limit(int64_t floor_bytes, double share_of_in_use) {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mutex);
  p.cache_floor = floor_bytes;
  p.cache_share = share_of_in_use;
}

// A child forked while another thread held the lock would wait on it forever.
void lock_before_fork() { pool().mutex.lock(); }
void unlock_after_fork() { pool().mutex.unlock(); }
const int fork_handlers = pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);

}  // namespace

TORCH_LIBRARY(peftlab_cpu_allocator, m) {
  m.def("install() -> ()", &install);
  m.def("uninstall() -> ()", &uninstall);
  m.def("release_cached() -> int", &release_cached);
  m.def("stats() -> int[]", &stats);
  m.def("active() -> bool", &active);
  m.def("set_cache_limit(int floor_bytes, float share_of_in_use) -> ()", &set_cache_limit);
}
