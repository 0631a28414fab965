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
// Ho = (H + 2p - kh) / s + 1. Patch row r = (b, i, j) holds, for each tap
// (di, dj), x[b, i*s - p + di, j*s - p + dj, :] or zeros outside the image.
//
//   cign_conv_forward:      y  = P(x) @ K                       (B,Ho,Wo,Co)
//   cign_conv_input_grad:   dx = col2im(g @ K^T)                (B,H,W,C)
//   cign_conv_kernel_grad:  dK = sum over rows of P(x)^T @ g    (kh*kw*C, Co)
//
// A transposed convolution is the adjoint of a convolution, so its three
// passes are these three with the roles exchanged (cign_jax/native_conv.py).
// Work is split into chunks of samples that run on XLA's own intra-op thread
// pool (so a kernel never competes with XLA's threads for the cores): no two
// chunks write the same output element, and the kernel gradient sums
// per-chunk partials in chunk order, so results do not depend on
// scheduling. Each chunk calls a single-threaded sgemm.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
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

int64_t ConvOut(int64_t size, int64_t k, int64_t s, int64_t p) {
  return (size + 2 * p - k) / s + 1;
}

// A positive integer from the environment (the tuning knobs below), else
// `fallback`.
int64_t EnvInt(const char* name, int64_t fallback) {
  if (const char* env = std::getenv(name)) {
    int64_t v = std::atoll(env);
    if (v > 0) return v;
  }
  return fallback;
}

// Rows per block: a patch block of about CIGN_JAX_NATIVE_BLOCK_KIB KiB
// (default 1024), at least CIGN_JAX_NATIVE_MIN_ROWS rows (default 256).
// 256 KiB / 16 rows made 16-row products for the generator's 4112-wide
// patches: channel_large's step took 9.8 s against 8.3 s (docs/performance.md).
int64_t BlockRows(int64_t patch_len) {
  static const int64_t floats = EnvInt("CIGN_JAX_NATIVE_BLOCK_KIB", 1024) * 256;
  static const int64_t min_rows = EnvInt("CIGN_JAX_NATIVE_MIN_ROWS", 256);
  return std::max<int64_t>(min_rows,
                           floats / std::max<int64_t>(patch_len, 1));
}

// Chunks claimed from a shared counter by the calling thread and by helper
// tasks on XLA's pool. The caller only ever waits for chunks that a running
// thread has claimed, so a busy pool cannot deadlock it; helpers that start
// after the work is gone return at once (the state is reference-counted).
struct ChunkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> fn;
  std::mutex mu;
  std::condition_variable finished;

  void Drain() {
    for (;;) {
      const int64_t chunk = next.fetch_add(1);
      if (chunk >= total) return;
      fn(chunk);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        finished.notify_all();
      }
    }
  }
};

// Number of chunks for `batch` samples of `work_per_sample` multiply-adds:
// CIGN_JAX_NATIVE_CHUNKS_PER_THREAD per pool thread (default 4: when XLA
// runs two ops at once, small chunks keep both threads busy; 1, 2 and 8 were
// slower for channel_large's step), none under about a million
// multiply-adds.
int64_t NumChunks(ffi::ThreadPool& pool, int64_t batch,
                  int64_t work_per_sample) {
  static const int64_t per_thread = EnvInt("CIGN_JAX_NATIVE_CHUNKS_PER_THREAD",
                                           4);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_work =
      std::max<int64_t>(1, batch * work_per_sample / (int64_t{1} << 20));
  return std::max<int64_t>(1, std::min({per_thread * threads, batch, by_work}));
}

// Runs fn(chunk) for chunk in [0, chunks) on the pool and this thread.
void RunChunks(ffi::ThreadPool& pool, int64_t chunks,
               std::function<void(int64_t)> fn) {
  if (chunks <= 1) {
    if (chunks == 1) fn(0);
    return;
  }
  auto queue = std::make_shared<ChunkQueue>();
  queue->total = chunks;
  queue->fn = std::move(fn);
  const int64_t helpers =
      std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([queue] { queue->Drain(); });
  }
  queue->Drain();
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->finished.wait(lock, [&] { return queue->done.load() == chunks; });
}

// Samples [first, end) of chunk c of n over a batch.
int64_t ChunkStart(int64_t batch, int64_t c, int64_t n) {
  return batch * c / n;
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

ffi::Error CheckGeometry(const Geometry& g, int64_t kernel_rows,
                         int64_t kernel_cols) {
  if (g.kh <= 0 || g.kw <= 0 || g.stride <= 0 || g.pad < 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign conv: kernel size and stride must be positive, "
                      "padding non-negative");
  if (g.ho != ConvOut(g.h, g.kh, g.stride, g.pad) ||
      g.wo != ConvOut(g.w, g.kw, g.stride, g.pad) || g.ho <= 0 || g.wo <= 0)
    return ffi::Error(
        ffi::ErrorCode::kInvalidArgument,
        "cign conv: output size " + std::to_string(g.ho) + "x" +
            std::to_string(g.wo) + " does not match input " +
            std::to_string(g.h) + "x" + std::to_string(g.w));
  if (kernel_rows != g.patch_len() || kernel_cols != g.co)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign conv: kernel matrix is " +
                          std::to_string(kernel_rows) + "x" +
                          std::to_string(kernel_cols) + ", expected " +
                          std::to_string(g.patch_len()) + "x" +
                          std::to_string(g.co));
  return ffi::Error::Success();
}

template <typename B>
bool Rank(const B& buf, size_t rank) {
  return buf.dimensions().size() == rank;
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> k,
                           ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                           int64_t kw, int64_t stride, int64_t pad) {
  if (!Rank(x, 4) || !Rank(k, 2) || !Rank(*y, 4))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign_conv_forward: x and y must be rank 4, the kernel "
                      "rank 2");
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3],
             kh,    kw,    stride, pad};
  if (yd[0] != g.b)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign_conv_forward: batch mismatch");
  if (auto err = CheckGeometry(g, kd[0], kd[1]); err.failure()) return err;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* out = y->typed_data();
  const int64_t len = g.patch_len(), per = g.rows_per_sample();
  const int64_t block = BlockRows(len);
  const int64_t chunks = NumChunks(pool, g.b, per * len * g.co);
  RunChunks(pool, chunks, [&](int64_t c) {
    const int64_t b0 = ChunkStart(g.b, c, chunks);
    const int64_t b1 = ChunkStart(g.b, c + 1, chunks);
    std::vector<float> patches(block * len);
    for (int64_t r = b0 * per; r < b1 * per; r += block) {
      const int64_t n = std::min(block, b1 * per - r);
      Im2col(xp, g, r, n, patches.data());
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, g.co,
                        len, 1.0f, patches.data(), len, kp, g.co, 0.0f,
                        out + r * g.co, g.co);
    }
  });
  return ffi::Error::Success();
}

ffi::Error ConvInputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gy,
                             ffi::Buffer<ffi::F32> k,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t kh,
                             int64_t kw, int64_t stride, int64_t pad) {
  if (!Rank(gy, 4) || !Rank(k, 2) || !Rank(*dx, 4))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign_conv_input_grad: g and dx must be rank 4, the "
                      "kernel rank 2");
  auto gd = gy.dimensions(), kd = k.dimensions(), xd = dx->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3],
             kh,    kw,    stride, pad};
  if (gd[0] != g.b)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign_conv_input_grad: batch mismatch");
  if (auto err = CheckGeometry(g, kd[0], kd[1]); err.failure()) return err;
  const float* gp = gy.typed_data();
  const float* kp = k.typed_data();
  float* out = dx->typed_data();
  const int64_t len = g.patch_len(), per = g.rows_per_sample();
  const int64_t block = BlockRows(len);
  const int64_t sample = g.h * g.w * g.c;
  const int64_t chunks = NumChunks(pool, g.b, per * len * g.co);
  RunChunks(pool, chunks, [&](int64_t c) {
    const int64_t b0 = ChunkStart(g.b, c, chunks);
    const int64_t b1 = ChunkStart(g.b, c + 1, chunks);
    std::memset(out + b0 * sample, 0, sizeof(float) * (b1 - b0) * sample);
    std::vector<float> cols(block * len);
    for (int64_t r = b0 * per; r < b1 * per; r += block) {
      const int64_t n = std::min(block, b1 * per - r);
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, len, g.co,
                        1.0f, gp + r * g.co, g.co, kp, g.co, 0.0f, cols.data(),
                        len);
      Col2imAdd(cols.data(), g, r, n, out);
    }
  });
  return ffi::Error::Success();
}

ffi::Error ConvKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> gy,
                              ffi::ResultBuffer<ffi::F32> dk, int64_t kh,
                              int64_t kw, int64_t stride, int64_t pad) {
  if (!Rank(x, 4) || !Rank(gy, 4) || !Rank(*dk, 2))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign_conv_kernel_grad: x and g must be rank 4, dk "
                      "rank 2");
  auto xd = x.dimensions(), gd = gy.dimensions(), kd = dk->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3],
             kh,    kw,    stride, pad};
  if (gd[0] != g.b)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cign_conv_kernel_grad: batch mismatch");
  if (auto err = CheckGeometry(g, kd[0], kd[1]); err.failure()) return err;
  const float* xp = x.typed_data();
  const float* gp = gy.typed_data();
  float* out = dk->typed_data();
  const int64_t len = g.patch_len(), per = g.rows_per_sample();
  // The product's inner dimension is the block's rows: larger blocks.
  const int64_t block = 4 * BlockRows(len);
  const int64_t size = len * g.co;
  const int64_t chunks = NumChunks(pool, g.b, per * len * g.co);
  // Chunk 0 accumulates into the result, the others into partials that are
  // added in chunk order afterwards.
  std::vector<std::vector<float>> partial(chunks);
  RunChunks(pool, chunks, [&](int64_t c) {
    const int64_t b0 = ChunkStart(g.b, c, chunks);
    const int64_t b1 = ChunkStart(g.b, c + 1, chunks);
    float* acc = out;
    if (c > 0) {
      partial[c].resize(size);
      acc = partial[c].data();
    }
    if (b0 == b1) {
      std::memset(acc, 0, sizeof(float) * size);
      return;
    }
    std::vector<float> patches(block * len);
    float beta = 0.0f;
    for (int64_t r = b0 * per; r < b1 * per; r += block) {
      const int64_t n = std::min(block, b1 * per - r);
      Im2col(xp, g, r, n, patches.data());
      scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, len, g.co, n,
                        1.0f, patches.data(), len, gp + r * g.co, g.co, beta,
                        acc, g.co);
      beta = 1.0f;
    }
  });
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = partial[c].data();
    for (int64_t e = 0; e < size; ++e) out[e] += p[e];
  }
  return ffi::Error::Success();
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
