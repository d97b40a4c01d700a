// SPDX-License-Identifier: Apache-2.0
// See heap_counter.hpp. glibc supports replacing its malloc by ELF symbol interposition (the
// replacement then also serves libc's, libstdc++'s and libgomp's internal allocations); the
// functions below count and forward to glibc's own allocator (__libc_malloc, ...), so
// malloc_usable_size stays valid on every pointer.
#include "heap_counter.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <new>

#if defined(__GLIBC__)
#include <malloc.h>
#define PROMOE_HEAP_COUNTING 1
#else
#define PROMOE_HEAP_COUNTING 0
#endif

namespace {

std::atomic<std::int64_t> g_live{0}, g_peak{0}, g_allocations{0};

#if PROMOE_HEAP_COUNTING
std::int64_t usable(void* p) { return static_cast<std::int64_t>(malloc_usable_size(p)); }

void on_alloc(void* p) {
  if (!p) return;
  const std::int64_t n = usable(p);
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  const std::int64_t live = g_live.fetch_add(n, std::memory_order_relaxed) + n;
  std::int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
}

void on_free(void* p) {
  if (p) g_live.fetch_sub(usable(p), std::memory_order_relaxed);
}
#endif

}  // namespace

namespace heap {
bool available() { return PROMOE_HEAP_COUNTING != 0; }
std::int64_t live_bytes() { return g_live.load(std::memory_order_relaxed); }
std::int64_t peak_bytes() { return g_peak.load(std::memory_order_relaxed); }
std::int64_t allocations() { return g_allocations.load(std::memory_order_relaxed); }
void reset_peak() { g_peak.store(g_live.load(std::memory_order_relaxed), std::memory_order_relaxed); }
}  // namespace heap

// ------------------------------------------------------------------------- malloc family
#if PROMOE_HEAP_COUNTING
extern "C" {
void* __libc_malloc(std::size_t);
void __libc_free(void*);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* __libc_valloc(std::size_t);
void* __libc_pvalloc(std::size_t);

void* malloc(std::size_t n) noexcept {
  void* p = __libc_malloc(n);
  on_alloc(p);
  return p;
}
void free(void* p) noexcept {
  on_free(p);
  __libc_free(p);
}
void* calloc(std::size_t count, std::size_t size) noexcept {
  void* p = __libc_calloc(count, size);
  on_alloc(p);
  return p;
}
void* realloc(void* p, std::size_t n) noexcept {
  const std::int64_t old = p ? usable(p) : 0;
  void* q = __libc_realloc(p, n);
  if (q || (p && n == 0)) g_live.fetch_sub(old, std::memory_order_relaxed);  // moved, resized or freed
  on_alloc(q);
  return q;
}
void* reallocarray(void* p, std::size_t count, std::size_t size) noexcept {
  if (size != 0 && count > static_cast<std::size_t>(-1) / size) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(p, count * size);
}
void* memalign(std::size_t alignment, std::size_t n) noexcept {
  void* p = __libc_memalign(alignment, n);
  on_alloc(p);
  return p;
}
void* aligned_alloc(std::size_t alignment, std::size_t n) noexcept { return memalign(alignment, n); }
int posix_memalign(void** out, std::size_t alignment, std::size_t n) noexcept {
  if (alignment < sizeof(void*) || (alignment & (alignment - 1)) != 0) return EINVAL;
  void* p = memalign(alignment, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
void* valloc(std::size_t n) noexcept {
  void* p = __libc_valloc(n);
  on_alloc(p);
  return p;
}
void* pvalloc(std::size_t n) noexcept {
  void* p = __libc_pvalloc(n);
  on_alloc(p);
  return p;
}
}  // extern "C"
#endif

// ------------------------------------------------------------------- operator new / delete
// Every replaceable form, on the (counted) malloc family.
namespace {

void* allocate(std::size_t n, std::size_t alignment) {
  if (n == 0) n = 1;
  for (;;) {
    void* p = nullptr;
    if (alignment <= alignof(std::max_align_t)) p = std::malloc(n);
    else if (posix_memalign(&p, std::max(alignment, sizeof(void*)), n) != 0) p = nullptr;
    if (p) return p;
    const std::new_handler handler = std::get_new_handler();
    if (!handler) throw std::bad_alloc();
    handler();
  }
}

void* allocate_nothrow(std::size_t n, std::size_t alignment) noexcept {
  try {
    return allocate(n, alignment);
  } catch (...) {
    return nullptr;
  }
}

constexpr std::size_t plain = alignof(std::max_align_t);
std::size_t align(std::align_val_t a) { return static_cast<std::size_t>(a); }

}  // namespace

void* operator new(std::size_t n) { return allocate(n, plain); }
void* operator new[](std::size_t n) { return allocate(n, plain); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate_nothrow(n, plain); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate_nothrow(n, plain); }
void* operator new(std::size_t n, std::align_val_t a) { return allocate(n, align(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return allocate(n, align(a)); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate_nothrow(n, align(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate_nothrow(n, align(a));
}

void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
