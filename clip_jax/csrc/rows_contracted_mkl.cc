// Weight gradients on CPU through MKL: x [R, K] and g [R, N] -> x^T @ g [K, N] in f32, one XLA FFI handler per
// operand dtype (bf16 x bf16 -> f32 accumulated in f32, and f32). Built and loaded by clip_jax/cpu_gemm.py.
//
// Why: XLA:CPU's dot library (YNNPACK) takes only row-major [M, K] x [K, N], so every weight gradient first
// copies x (or g) transposed, a DRAM-bound pass over the layer's activations. MKL's GEMM reads the operand
// transposed in its own blocked packing. MKL runs in its sequential layer; a large product is split in two
// halves of the output's rows, one run on the calling thread and one offered to XLA's intra-op thread pool
// (taken back by the calling thread if no pool thread has started it by then), so a weight gradient uses
// both cores when the other is free, as XLA's own dots do, and never waits for a busy pool.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
// MKL's CBLAS (libmkl_rt, LP64 interface: 32-bit integers; the caller checks the sizes fit).
void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc);
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc);
int MKL_Set_Threading_Layer(int layer);
int MKL_Set_Interface_Layer(int layer);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// out[k0:k1] = x[:, k0:k1]^T @ g: rows k0..k1 of x^T [K, R] @ g [R, N], x read transposed in place (lda = K).
template <typename T>
void OutputRows(const T* x, const T* g, float* out, int64_t rows, int64_t k, int64_t n, int64_t k0, int64_t k1) {
  if constexpr (sizeof(T) == 2) {
    cblas_gemm_bf16bf16f32(kRowMajor, kTrans, kNoTrans, k1 - k0, n, rows, 1.0f, x + k0, k, g, n, 0.0f,
                           out + k0 * n, n);
  } else {
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, k1 - k0, n, rows, 1.0f, x + k0, k, g, n, 0.0f, out + k0 * n, n);
  }
}

// Whoever claims the second half first (a pool thread or the caller) computes it; `done` tells the caller
// that a pool thread has. Shared, because the pool may run its task after the handler has returned.
struct SecondHalf {
  std::atomic<bool> claimed{false};
  std::mutex mutex;
  std::condition_variable finished;
  bool done = false;
};

// Products below this many multiply-adds run whole on the calling thread (splitting costs a second packing
// of g and a hand-off).
constexpr int64_t kSplitMinMacs = int64_t{1} << 24;

template <ffi::DataType T>
ffi::Error RowsContracted(ffi::ThreadPool pool, ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> g,
                          ffi::ResultBuffer<ffi::F32, 2> out) {
  using Native = ffi::NativeType<T>;
  const int64_t rows = x.dimensions()[0], k = x.dimensions()[1], n = g.dimensions()[1];
  if (g.dimensions()[0] != rows) return ffi::Error::InvalidArgument("rows_contracted: x and g differ in rows");
  float* result = out->typed_data();
  if (rows == 0) {  // an empty sum
    std::memset(result, 0, sizeof(float) * k * n);
    return ffi::Error::Success();
  }
  const Native* xs = x.typed_data();
  const Native* gs = g.typed_data();
  if (k < 64 || rows * k * n < kSplitMinMacs) {
    OutputRows(xs, gs, result, rows, k, n, 0, k);
    return ffi::Error::Success();
  }
  const int64_t middle = (k / 2 + 15) / 16 * 16;
  auto second = std::make_shared<SecondHalf>();
  pool.Schedule([second, xs, gs, result, rows, k, n, middle] {
    if (second->claimed.exchange(true)) return;  // the caller took it back (and may have returned)
    OutputRows(xs, gs, result, rows, k, n, middle, k);
    std::lock_guard<std::mutex> lock(second->mutex);
    second->done = true;
    second->finished.notify_one();
  });
  OutputRows(xs, gs, result, rows, k, n, 0, middle);
  if (!second->claimed.exchange(true)) {
    OutputRows(xs, gs, result, rows, k, n, middle, k);
  } else {
    std::unique_lock<std::mutex> lock(second->mutex);
    second->finished.wait(lock, [&] { return second->done; });
  }
  return ffi::Error::Success();
}

// Aliases: a template argument list's comma would split the handler macro's arguments.
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(clip_jax_rows_contracted_bf16, RowsContracted<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bf16Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Matrix>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(clip_jax_rows_contracted_f32, RowsContracted<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>());

// Called once before the first GEMM: MKL's sequential threading layer (1) and the LP64 interface (0).
// Returns the threading layer MKL reports back (1 when it took).
extern "C" int clip_jax_mkl_init() {
  MKL_Set_Interface_Layer(0);
  return MKL_Set_Threading_Layer(1);
}
