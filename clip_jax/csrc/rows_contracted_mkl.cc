// Weight gradients on CPU through MKL: x [R, K] and g [R, N] -> x^T @ g [K, N] in f32, one XLA FFI handler per
// operand dtype (bf16 x bf16 -> f32 accumulated in f32, and f32). Built and loaded by clip_jax/cpu_gemm.py.
//
// Why: XLA:CPU's dot library (YNNPACK) takes only row-major [M, K] x [K, N], so every weight gradient first
// copies x (or g) transposed, a DRAM-bound pass over the layer's activations. MKL's GEMM reads the operand
// transposed in its own blocked packing. MKL runs here on the calling thread (sequential layer): XLA already
// runs independent ops side by side on its own threads.
#include <cstdint>
#include <cstring>

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

template <ffi::DataType T>
ffi::Error RowsContracted(ffi::Buffer<T, 2> x, ffi::Buffer<T, 2> g, ffi::ResultBuffer<ffi::F32, 2> out) {
  const int64_t rows = x.dimensions()[0], k = x.dimensions()[1], n = g.dimensions()[1];
  if (g.dimensions()[0] != rows) return ffi::Error::InvalidArgument("rows_contracted: x and g differ in rows");
  if (rows == 0) {  // an empty sum
    std::memset(out->typed_data(), 0, sizeof(float) * k * n);
    return ffi::Error::Success();
  }
  // out [K, N] = x^T [K, R] @ g [R, N]; x is read transposed in place (lda = K).
  if constexpr (T == ffi::DataType::BF16) {
    cblas_gemm_bf16bf16f32(kRowMajor, kTrans, kNoTrans, k, n, rows, 1.0f, x.typed_data(), k, g.typed_data(), n,
                           0.0f, out->typed_data(), n);
  } else {
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, k, n, rows, 1.0f, x.typed_data(), k, g.typed_data(), n, 0.0f,
                out->typed_data(), n);
  }
  return ffi::Error::Success();
}

// Aliases: a template argument list's comma would split the handler macro's arguments.
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(clip_jax_rows_contracted_bf16, RowsContracted<ffi::DataType::BF16>,
                              ffi::Ffi::Bind()
                                  .Arg<Bf16Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Matrix>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(clip_jax_rows_contracted_f32, RowsContracted<ffi::DataType::F32>,
                              ffi::Ffi::Bind()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>());

// Called once before the first GEMM: MKL's sequential threading layer (1) and the LP64 interface (0).
// Returns the threading layer MKL reports back (1 when it took).
extern "C" int clip_jax_mkl_init() {
  MKL_Set_Interface_Layer(0);
  return MKL_Set_Threading_Layer(1);
}
