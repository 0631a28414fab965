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
// passes are these three with the roles exchanged (../native_conv.py).
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

// Runs fn(chunk, first_sample, end_sample) for `chunks` contiguous ranges
// of a batch's samples (RunChunks).
template <typename Fn>
void RunSampleChunks(ffi::ThreadPool& pool, int64_t batch, int64_t chunks,
                     Fn fn) {
  RunChunks(pool, chunks, [&](int64_t c) {
    fn(c, batch * c / chunks, batch * (c + 1) / chunks);
  });
}

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
  *g = Geometry{image[0], image[1],    image[2], image[3],
                conv_out[1], conv_out[2], conv_out[3],
                kh,       kw,          stride,   pad};
  if (conv_out[0] != g->b)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      name + ": batch mismatch");
  if (kh <= 0 || kw <= 0 || stride <= 0 || pad < 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      name + ": kernel size and stride must be positive, "
                             "padding non-negative");
  if (g->ho != ConvOut(g->h, kh, stride, pad) ||
      g->wo != ConvOut(g->w, kw, stride, pad) || g->ho <= 0 || g->wo <= 0)
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

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> k,
                           ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                           int64_t kw, int64_t stride, int64_t pad) {
  Geometry g;
  if (auto err = DecodeGeometry("cign_conv_forward", x.dimensions(),
                                y->dimensions(), k.dimensions(), kh, kw,
                                stride, pad, &g);
      err.failure())
    return err;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* out = y->typed_data();
  const int64_t len = g.patch_len();
  const int64_t block = BlockRows(len);
  const int64_t chunks =
      NumChunks(pool, g.b, g.rows_per_sample() * len * g.co);
  RunSampleChunks(pool, g.b, chunks, [&](int64_t, int64_t b0, int64_t b1) {
    std::vector<float> patches(block * len);
    ForEachBlock(g, b0, b1, block, [&](int64_t r, int64_t n) {
      Im2col(xp, g, r, n, patches.data());
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, g.co,
                        len, 1.0f, patches.data(), len, kp, g.co, 0.0f,
                        out + r * g.co, g.co);
    });
  });
  return ffi::Error::Success();
}

ffi::Error ConvInputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gy,
                             ffi::Buffer<ffi::F32> k,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t kh,
                             int64_t kw, int64_t stride, int64_t pad) {
  Geometry g;
  if (auto err = DecodeGeometry("cign_conv_input_grad", dx->dimensions(),
                                gy.dimensions(), k.dimensions(), kh, kw,
                                stride, pad, &g);
      err.failure())
    return err;
  const float* gp = gy.typed_data();
  const float* kp = k.typed_data();
  float* out = dx->typed_data();
  const int64_t len = g.patch_len();
  const int64_t block = BlockRows(len);
  const int64_t sample = g.h * g.w * g.c;
  const int64_t chunks =
      NumChunks(pool, g.b, g.rows_per_sample() * len * g.co);
  RunSampleChunks(pool, g.b, chunks, [&](int64_t, int64_t b0, int64_t b1) {
    std::memset(out + b0 * sample, 0, sizeof(float) * (b1 - b0) * sample);
    std::vector<float> cols(block * len);
    ForEachBlock(g, b0, b1, block, [&](int64_t r, int64_t n) {
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, len, g.co,
                        1.0f, gp + r * g.co, g.co, kp, g.co, 0.0f, cols.data(),
                        len);
      Col2imAdd(cols.data(), g, r, n, out);
    });
  });
  return ffi::Error::Success();
}

ffi::Error ConvKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> gy,
                              ffi::ResultBuffer<ffi::F32> dk, int64_t kh,
                              int64_t kw, int64_t stride, int64_t pad) {
  Geometry g;
  if (auto err = DecodeGeometry("cign_conv_kernel_grad", x.dimensions(),
                                gy.dimensions(), dk->dimensions(), kh, kw,
                                stride, pad, &g);
      err.failure())
    return err;
  const float* xp = x.typed_data();
  const float* gp = gy.typed_data();
  float* out = dk->typed_data();
  const int64_t len = g.patch_len();
  // The product's inner dimension is the block's rows: larger blocks.
  const int64_t block = 4 * BlockRows(len);
  const int64_t size = len * g.co;
  const int64_t chunks =
      NumChunks(pool, g.b, g.rows_per_sample() * len * g.co);
  // Chunk 0 accumulates into the result, the others into partials that are
  // added in chunk order afterwards.
  std::vector<std::vector<float>> partial(chunks);
  RunSampleChunks(pool, g.b, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
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
    ForEachBlock(g, b0, b1, block, [&](int64_t r, int64_t n) {
      Im2col(xp, g, r, n, patches.data());
      scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, len, g.co, n,
                        1.0f, patches.data(), len, gp + r * g.co, g.co, beta,
                        acc, g.co);
      beta = 1.0f;
    });
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
