// CPU kernels for CIGN's shared-kernel convolutions, as XLA FFI custom calls.
//
// Each pass of a convolution (forward, input gradient, kernel gradient) is a
// matrix product with im2col patches. XLA builds those patches as one full
// (B*H'*W', kh*kw*C) array in memory (its slice/concatenate code ran at about
// 1.3 GB/s here, 4-5x the cost of the product itself). These kernels build
// them a block of rows at a time (about 1 MiB, the L2 of a Zen 4 core, but
// at least 256 rows so that each sgemm call amortises packing the kernel
// matrix) and hand each block to OpenBLAS's sgemm (the scipy-openblas32
// build): the whole patch array never exists.
//
// Geometry (PyTorch's conv2d, NHWC): x (B, H, W, C), kernel as a matrix
// (kh*kw*C, Co) in (di, dj, c) row order, output (B, Ho, Wo, Co) with
// Ho = floor((H + 2p - kh) / s) + 1, or 0 when the kernel does not fit
// (lax's sizes: an empty output, zero gradients). Patch row r = (b, i, j)
// holds, for each tap (di, dj), x[b, i*s - p + di, j*s - p + dj, :] or
// zeros outside the image.
//
//   cign_conv_forward:      y  = P(x) @ K                       (B,Ho,Wo,Co)
//   cign_conv_input_grad:   dx = col2im(g @ K^T)                (B,H,W,C)
//   cign_conv_kernel_grad:  dK = sum over rows of P(x)^T @ g    (kh*kw*C, Co)
//
// A transposed convolution is the adjoint of a convolution, so its three
// passes are these three with the roles exchanged (../native_conv.py).
// Work is split into chunks of samples that run on XLA's own intra-op thread
// pool (so a kernel never competes with XLA's threads for the cores): no two
// chunks write the same output element, and the kernel gradient adds
// per-chunk partials in chunk order (at most a few alive at once), so
// results do not depend on scheduling. Each chunk calls a single-threaded
// sgemm. A chunk that cannot get its scratch memory (or fails otherwise)
// ends the call with an error status (RESOURCE_EXHAUSTED for memory) that
// XLA raises in Python; no exception leaves a chunk or this library.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t b, h, w, c;  // the convolution's input
  int64_t ho, wo, co;  // its output
  int64_t kh, kw, stride, pad;
  int64_t patch_len() const { return kh * kw * c; }
  int64_t rows_per_sample() const { return ho * wo; }
};

// Kernel size, stride and padding above this are refused before any
// arithmetic with them (cign_jax/native_conv.py checks the same bound).
constexpr int64_t kMaxAttr = int64_t{1} << 20;

// Output size along one axis, with Python's (and lax's) arithmetic: floor
// division, and 0 where the kernel does not fit at all. (C++'s `/` rounds
// toward zero: (2 - 3) / 2 + 1 would be 1, not 0.)
int64_t ConvOut(int64_t size, int64_t k, int64_t s, int64_t p) {
  const int64_t span = size + 2 * p - k;
  return span < 0 ? 0 : span / s + 1;
}

// An integer tuning knob from the environment, clamped to [1, max_value];
// `fallback` when unset, not an integer, or not positive.
// (cign_jax/native_conv.py refuses out-of-range values before loading;
// the clamp keeps a value set later from overflowing a size.)
int64_t EnvInt(const char* name, int64_t fallback, int64_t max_value) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(env, &end, 10);
  if (end == env || *end != '\0') return fallback;
  if (errno == ERANGE) return v > 0 ? max_value : fallback;
  if (v <= 0) return fallback;
  return std::min<int64_t>(v, max_value);
}

// Rows per block: a patch block of about CIGN_JAX_NATIVE_BLOCK_KIB KiB
// (default 1024, at most 1 GiB), at least CIGN_JAX_NATIVE_MIN_ROWS rows
// (default 256, at most 65536). 256 KiB / 16 rows made 16-row products for
// the generator's 4112-wide patches: channel_large's step took 9.8 s
// against 8.3 s (docs/performance.md).
int64_t BlockRows(int64_t patch_len) {
  static const int64_t floats =
      EnvInt("CIGN_JAX_NATIVE_BLOCK_KIB", 1024, int64_t{1} << 20) * 256;
  static const int64_t min_rows =
      EnvInt("CIGN_JAX_NATIVE_MIN_ROWS", 256, int64_t{1} << 16);
  return std::max<int64_t>(min_rows,
                           floats / std::max<int64_t>(patch_len, 1));
}

// Scratch for `rows` x `cols` floats, uninitialised. Throws std::bad_alloc
// when the size overflows or the memory is not there. For tests,
// CIGN_JAX_NATIVE_TEST_FAIL_CHUNK=<n> makes chunk n's allocation fail.
std::unique_ptr<float[]> Scratch(int64_t rows, int64_t cols, int64_t chunk) {
  if (const char* env = std::getenv("CIGN_JAX_NATIVE_TEST_FAIL_CHUNK")) {
    char* end = nullptr;
    const long long fail = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && fail == chunk) throw std::bad_alloc();
  }
  const int64_t max_floats =
      std::numeric_limits<int64_t>::max() / int64_t{sizeof(float)};
  if (rows < 0 || cols < 0 || (cols > 0 && rows > max_floats / cols))
    throw std::bad_alloc();
  return std::unique_ptr<float[]>(new float[std::max<int64_t>(rows * cols, 1)]);
}

// Chunks claimed from a shared counter by the calling thread and by helper
// tasks on XLA's pool. The caller only ever waits for chunks that a running
// thread has claimed, so a busy pool cannot deadlock it; helpers that start
// after the work is gone return at once (the state is reference-counted).
// A chunk that throws records the first error; the chunks not yet started
// are then skipped, and the caller returns that error once every claimed
// chunk has finished (so no helper still uses the caller's buffers).
struct ChunkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> failed{false};
  int64_t total = 0;
  std::string pass;
  std::function<void(int64_t)> fn;
  std::mutex mu;
  std::condition_variable finished;
  ffi::ErrorCode error_code = ffi::ErrorCode::kInternal;  // guarded by mu
  std::string error_message;                               // guarded by mu

  // Records the first failure (the message is best effort: building it
  // may itself run out of memory).
  void Fail(ffi::ErrorCode code, int64_t chunk, const char* what) {
    std::lock_guard<std::mutex> lock(mu);
    if (failed.load()) return;
    error_code = code;
    try {
      error_message = pass + ": chunk " + std::to_string(chunk) + " of " +
                      std::to_string(total) + ": " + what;
    } catch (...) {
    }
    failed.store(true);
  }

  void RunOne(int64_t chunk) {
    if (failed.load()) return;
    try {
      fn(chunk);
    } catch (const std::bad_alloc&) {
      Fail(ffi::ErrorCode::kResourceExhausted, chunk,
           "out of memory for its scratch");
    } catch (const std::exception& e) {
      Fail(ffi::ErrorCode::kInternal, chunk, e.what());
    } catch (...) {
      Fail(ffi::ErrorCode::kInternal, chunk, "failed");
    }
  }

  void Drain() {
    for (;;) {
      const int64_t chunk = next.fetch_add(1);
      if (chunk >= total) return;
      RunOne(chunk);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        finished.notify_all();
      }
    }
  }

  ffi::Error Status() {
    std::lock_guard<std::mutex> lock(mu);
    if (!failed.load()) return ffi::Error::Success();
    return ffi::Error(error_code, error_message);
  }
};

// The threads that run a call's chunks: the caller and up to
// pool.num_threads() helpers, but no more than there are chunks.
int64_t RunningThreads(ffi::ThreadPool& pool, int64_t chunks) {
  return std::max<int64_t>(
      1, std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks));
}

// Number of chunks for `batch` samples of `work_per_sample` multiply-adds:
// CIGN_JAX_NATIVE_CHUNKS_PER_THREAD per pool thread (default 4, at most 64:
// when XLA runs two ops at once, small chunks keep both threads busy; 1, 2
// and 8 were slower for channel_large's step), none under about a million
// multiply-adds.
int64_t NumChunks(ffi::ThreadPool& pool, int64_t batch,
                  int64_t work_per_sample) {
  static const int64_t per_thread =
      EnvInt("CIGN_JAX_NATIVE_CHUNKS_PER_THREAD", 4, 64);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t max_work = std::numeric_limits<int64_t>::max();
  const int64_t by_work =
      (batch > 0 && work_per_sample > max_work / batch)
          ? batch
          : std::max<int64_t>(1, batch * work_per_sample / (int64_t{1} << 20));
  return std::max<int64_t>(1, std::min({per_thread * threads, batch, by_work}));
}

// Runs fn(chunk) for chunk in [0, chunks) on the pool and this thread;
// returns the first chunk's error (RESOURCE_EXHAUSTED for memory), if any.
ffi::Error RunChunks(ffi::ThreadPool& pool, const char* pass, int64_t chunks,
                     std::function<void(int64_t)> fn) {
  if (chunks <= 0) return ffi::Error::Success();
  std::shared_ptr<ChunkQueue> queue;
  try {
    queue = std::make_shared<ChunkQueue>();
    queue->pass = pass;
    queue->fn = std::move(fn);
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(pass) + ": out of memory");
  }
  queue->total = chunks;
  const int64_t helpers = RunningThreads(pool, chunks) - 1;
  try {
    for (int64_t h = 0; h < helpers; ++h) {
      pool.Schedule([queue] { queue->Drain(); });
    }
  } catch (...) {
    // Could not schedule more helpers: the ones scheduled and this thread
    // do the work.
  }
  queue->Drain();
  {
    std::unique_lock<std::mutex> lock(queue->mu);
    queue->finished.wait(lock, [&] { return queue->done.load() == chunks; });
  }
  return queue->Status();
}

// Runs fn(chunk, first_sample, end_sample) for `chunks` contiguous ranges
// of a batch's samples (RunChunks).
template <typename Fn>
ffi::Error RunSampleChunks(ffi::ThreadPool& pool, const char* pass,
                           int64_t batch, int64_t chunks, Fn fn) {
  return RunChunks(pool, pass, chunks, [&](int64_t c) {
    fn(c, batch * c / chunks, batch * (c + 1) / chunks);
  });
}

// The kernel gradient's sum over chunks, in chunk order with at most
// `window` partials alive: chunk 0 accumulates into the result itself;
// chunk c > 0 waits until chunk c - window has been added, accumulates
// into a partial of its own, and hands it to Finish, which adds the
// finished partials to the result in chunk order. The order of the
// additions is fixed (((chunk 0 + 1) + 2) + ...), whatever the window and
// the scheduling. Waiting cannot deadlock: chunks are claimed in order, so
// every chunk before a waiting one is being run by some thread, and the
// first unfinished chunk never waits.
class OrderedSum {
 public:
  OrderedSum(float* out, int64_t size, int64_t chunks, int64_t window)
      : out_(out), size_(size), window_(std::max<int64_t>(window, 1)),
        partials_(chunks), finished_(chunks, 0) {}

  // Blocks until chunk c may hold a partial; false when the call failed.
  bool WaitForSlot(int64_t c) {
    std::unique_lock<std::mutex> lock(mu_);
    slot_.wait(lock, [&] { return aborted_ || c < added_ + window_; });
    return !aborted_;
  }

  // Chunk c is done (partial: its sum, or null for chunk 0).
  void Finish(int64_t c, std::unique_ptr<float[]> partial) {
    std::lock_guard<std::mutex> lock(mu_);
    partials_[c] = std::move(partial);
    finished_[c] = 1;
    const int64_t before = added_;
    while (added_ < static_cast<int64_t>(finished_.size()) &&
           finished_[added_]) {
      if (const float* p = partials_[added_].get()) {
        for (int64_t e = 0; e < size_; ++e) out_[e] += p[e];
        partials_[added_].reset();
      }
      ++added_;
    }
    if (added_ != before) slot_.notify_all();
  }

  // A chunk failed: wake every waiting chunk (the result is discarded).
  void Abort() {
    std::lock_guard<std::mutex> lock(mu_);
    aborted_ = true;
    slot_.notify_all();
  }

 private:
  float* const out_;
  const int64_t size_;
  const int64_t window_;
  std::mutex mu_;
  std::condition_variable slot_;
  int64_t added_ = 0;  // chunks [0, added_) are in out_
  bool aborted_ = false;
  std::vector<std::unique_ptr<float[]>> partials_;
  std::vector<char> finished_;
};

// Calls fn(first_row, rows) for consecutive blocks of at most `block` rows
// covering the patch rows of samples [b0, b1).
template <typename Fn>
void ForEachBlock(const Geometry& g, int64_t b0, int64_t b1, int64_t block,
                  Fn fn) {
  const int64_t per = g.rows_per_sample();
  for (int64_t r = b0 * per; r < b1 * per; r += block) {
    fn(r, std::min(block, b1 * per - r));
  }
}

// Patch rows r0 .. r0+n-1 (flat over (b, i, j)) into p (n, patch_len).
void Im2col(const float* x, const Geometry& g, int64_t r0, int64_t n,
            float* p) {
  const int64_t len = g.patch_len(), tap_row = g.kw * g.c;
  for (int64_t rr = 0; rr < n; ++rr) {
    const int64_t r = r0 + rr;
    const int64_t j = r % g.wo, i = (r / g.wo) % g.ho, b = r / (g.wo * g.ho);
    const int64_t w0 = j * g.stride - g.pad;
    const int64_t lo = std::max<int64_t>(0, -w0);
    const int64_t hi = std::min<int64_t>(g.kw, g.w - w0);
    float* dst = p + rr * len;
    for (int64_t di = 0; di < g.kh; ++di, dst += tap_row) {
      const int64_t h = i * g.stride - g.pad + di;
      if (h < 0 || h >= g.h || lo >= hi) {
        std::memset(dst, 0, sizeof(float) * tap_row);
        continue;
      }
      if (lo > 0) std::memset(dst, 0, sizeof(float) * lo * g.c);
      std::memcpy(dst + lo * g.c, x + ((b * g.h + h) * g.w + w0 + lo) * g.c,
                  sizeof(float) * (hi - lo) * g.c);
      if (hi < g.kw)
        std::memset(dst + hi * g.c, 0, sizeof(float) * (g.kw - hi) * g.c);
    }
  }
}

// dx += col2im(cols) for patch rows r0 .. r0+n-1 (the adjoint of Im2col).
void Col2imAdd(const float* cols, const Geometry& g, int64_t r0, int64_t n,
               float* dx) {
  const int64_t len = g.patch_len(), tap_row = g.kw * g.c;
  for (int64_t rr = 0; rr < n; ++rr) {
    const int64_t r = r0 + rr;
    const int64_t j = r % g.wo, i = (r / g.wo) % g.ho, b = r / (g.wo * g.ho);
    const int64_t w0 = j * g.stride - g.pad;
    const int64_t lo = std::max<int64_t>(0, -w0);
    const int64_t hi = std::min<int64_t>(g.kw, g.w - w0);
    if (lo >= hi) continue;
    const float* src = cols + rr * len;
    for (int64_t di = 0; di < g.kh; ++di, src += tap_row) {
      const int64_t h = i * g.stride - g.pad + di;
      if (h < 0 || h >= g.h) continue;
      float* d = dx + ((b * g.h + h) * g.w + w0 + lo) * g.c;
      const float* s = src + lo * g.c;
      const int64_t count = (hi - lo) * g.c;
      for (int64_t e = 0; e < count; ++e) d[e] += s[e];
    }
  }
}

// The checked geometry of one pass from its buffers' shapes: `image` is the
// convolution's input side (B, H, W, C), `conv_out` its output side
// (B, Ho, Wo, Co), `kernel` the kernel matrix (kh*kw*C, Co).
ffi::Error DecodeGeometry(const char* pass, ffi::Span<const int64_t> image,
                          ffi::Span<const int64_t> conv_out,
                          ffi::Span<const int64_t> kernel, int64_t kh,
                          int64_t kw, int64_t stride, int64_t pad,
                          Geometry* g) {
  const std::string name(pass);
  if (image.size() != 4 || conv_out.size() != 4 || kernel.size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      name + ": images must be rank 4, the kernel matrix "
                             "rank 2");
  // The attributes are checked before any arithmetic with them.
  if (kh <= 0 || kw <= 0 || stride <= 0 || pad < 0 || kh > kMaxAttr ||
      kw > kMaxAttr || stride > kMaxAttr || pad > kMaxAttr)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      name + ": kernel size and stride must be in [1, " +
                          std::to_string(kMaxAttr) + "], padding in [0, " +
                          std::to_string(kMaxAttr) + "]; got kernel " +
                          std::to_string(kh) + "x" + std::to_string(kw) +
                          ", stride " + std::to_string(stride) +
                          ", padding " + std::to_string(pad));
  *g = Geometry{image[0], image[1],    image[2], image[3],
                conv_out[1], conv_out[2], conv_out[3],
                kh,       kw,          stride,   pad};
  if (conv_out[0] != g->b)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      name + ": batch mismatch");
  if (g->ho != ConvOut(g->h, kh, stride, pad) ||
      g->wo != ConvOut(g->w, kw, stride, pad))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      name + ": output size " + std::to_string(g->ho) + "x" +
                          std::to_string(g->wo) + " does not match input " +
                          std::to_string(g->h) + "x" + std::to_string(g->w));
  if (kernel[0] != g->patch_len() || kernel[1] != g->co)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      name + ": kernel matrix is " +
                          std::to_string(kernel[0]) + "x" +
                          std::to_string(kernel[1]) + ", expected " +
                          std::to_string(g->patch_len()) + "x" +
                          std::to_string(g->co));
  return ffi::Error::Success();
}

// Multiply-adds per sample (saturating: only compared against bounds).
int64_t WorkPerSample(const Geometry& g) {
  const double work = static_cast<double>(g.rows_per_sample()) *
                      static_cast<double>(g.patch_len()) *
                      static_cast<double>(g.co);
  return work >= 9.0e18 ? int64_t{9000000000000000000}
                        : static_cast<int64_t>(work);
}

// A pass's body, with anything thrown outside the chunks (allocating the
// chunk state) turned into an error status instead of crossing into XLA.
template <typename Fn>
ffi::Error Guarded(const char* pass, Fn body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      std::string(pass) + ": out of memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string(pass) + ": " + e.what());
  }
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> k,
                           ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                           int64_t kw, int64_t stride, int64_t pad) {
  constexpr const char* kPass = "cign_conv_forward";
  Geometry g;
  if (auto err = DecodeGeometry(kPass, x.dimensions(), y->dimensions(),
                                k.dimensions(), kh, kw, stride, pad, &g);
      err.failure())
    return err;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* out = y->typed_data();
  const int64_t len = g.patch_len();
  if (y->element_count() == 0) return ffi::Error::Success();
  if (len == 0) {  // no input channels: a sum of nothing
    std::memset(out, 0, sizeof(float) * y->element_count());
    return ffi::Error::Success();
  }
  return Guarded(kPass, [&] {
    const int64_t block = BlockRows(len);
    const int64_t chunks = NumChunks(pool, g.b, WorkPerSample(g));
    return RunSampleChunks(
        pool, kPass, g.b, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
          const int64_t rows = (b1 - b0) * g.rows_per_sample();
          auto patches = Scratch(std::min(block, rows), len, c);
          ForEachBlock(g, b0, b1, block, [&](int64_t r, int64_t n) {
            Im2col(xp, g, r, n, patches.get());
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n,
                              g.co, len, 1.0f, patches.get(), len, kp, g.co,
                              0.0f, out + r * g.co, g.co);
          });
        });
  });
}

ffi::Error ConvInputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gy,
                             ffi::Buffer<ffi::F32> k,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t kh,
                             int64_t kw, int64_t stride, int64_t pad) {
  constexpr const char* kPass = "cign_conv_input_grad";
  Geometry g;
  if (auto err = DecodeGeometry(kPass, dx->dimensions(), gy.dimensions(),
                                k.dimensions(), kh, kw, stride, pad, &g);
      err.failure())
    return err;
  const float* gp = gy.typed_data();
  const float* kp = k.typed_data();
  float* out = dx->typed_data();
  const int64_t len = g.patch_len();
  if (dx->element_count() == 0) return ffi::Error::Success();
  if (gy.element_count() == 0 || len == 0) {
    // No output position reads x (or nothing flows back): zeros, as the
    // autodiff gradient of an empty convolution.
    std::memset(out, 0, sizeof(float) * dx->element_count());
    return ffi::Error::Success();
  }
  return Guarded(kPass, [&] {
    const int64_t block = BlockRows(len);
    const int64_t sample = g.h * g.w * g.c;
    const int64_t chunks = NumChunks(pool, g.b, WorkPerSample(g));
    return RunSampleChunks(
        pool, kPass, g.b, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
          const int64_t rows = (b1 - b0) * g.rows_per_sample();
          auto cols = Scratch(std::min(block, rows), len, c);
          std::memset(out + b0 * sample, 0,
                      sizeof(float) * (b1 - b0) * sample);
          ForEachBlock(g, b0, b1, block, [&](int64_t r, int64_t n) {
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, len,
                              g.co, 1.0f, gp + r * g.co, g.co, kp, g.co, 0.0f,
                              cols.get(), len);
            Col2imAdd(cols.get(), g, r, n, out);
          });
        });
  });
}

ffi::Error ConvKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> gy,
                              ffi::ResultBuffer<ffi::F32> dk, int64_t kh,
                              int64_t kw, int64_t stride, int64_t pad) {
  constexpr const char* kPass = "cign_conv_kernel_grad";
  Geometry g;
  if (auto err = DecodeGeometry(kPass, x.dimensions(), gy.dimensions(),
                                dk->dimensions(), kh, kw, stride, pad, &g);
      err.failure())
    return err;
  const float* xp = x.typed_data();
  const float* gp = gy.typed_data();
  float* out = dk->typed_data();
  const int64_t len = g.patch_len();
  const int64_t size = len * g.co;
  if (size == 0) return ffi::Error::Success();
  if (gy.element_count() == 0) {  // no output positions: nothing to sum
    std::memset(out, 0, sizeof(float) * size);
    return ffi::Error::Success();
  }
  return Guarded(kPass, [&] {
    // The product's inner dimension is the block's rows: larger blocks.
    const int64_t block = 4 * BlockRows(len);
    const int64_t chunks = NumChunks(pool, g.b, WorkPerSample(g));
    // Partials alive at once: two per running thread (so a thread rarely
    // waits for an earlier chunk), within CIGN_JAX_NATIVE_PARTIAL_MIB MiB
    // (default 256, at most 1 TiB), at least one.
    const int64_t budget_floats =
        EnvInt("CIGN_JAX_NATIVE_PARTIAL_MIB", 256, int64_t{1} << 20) *
        (int64_t{1} << 18);
    const int64_t window = std::max<int64_t>(
        1, std::min(2 * RunningThreads(pool, chunks), budget_floats / size));
    OrderedSum sum(out, size, chunks, window);
    return RunSampleChunks(
        pool, kPass, g.b, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
          try {
            std::unique_ptr<float[]> partial;
            float* acc = out;
            if (c > 0) {
              if (!sum.WaitForSlot(c)) return;  // another chunk failed
              partial = Scratch(size, 1, c);
              acc = partial.get();
            }
            if (b0 == b1) {
              std::memset(acc, 0, sizeof(float) * size);
            } else {
              const int64_t rows = (b1 - b0) * g.rows_per_sample();
              auto patches = Scratch(std::min(block, rows), len, c);
              float beta = 0.0f;
              ForEachBlock(g, b0, b1, block, [&](int64_t r, int64_t n) {
                Im2col(xp, g, r, n, patches.get());
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans,
                                  len, g.co, n, 1.0f, patches.get(), len,
                                  gp + r * g.co, g.co, beta, acc, g.co);
                beta = 1.0f;
              });
            }
            sum.Finish(c, std::move(partial));
          } catch (...) {
            sum.Abort();
            throw;
          }
        });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CignConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CignConvInputGrad, ConvInputGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CignConvKernelGrad, ConvKernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

// OpenBLAS's own threads would compete with XLA's: one per call.
extern "C" void cign_native_init() { scipy_openblas_set_num_threads(1); }
