// The plain LSTM's and the reset-after GRU's time loops as XLA FFI custom calls on the CPU
// (recur/kernels/cpu.py).
//
// XLA:CPU runs a scanned LSTM step as several thunks (the recurrent dot on both threads, the
// element-wise gate fusion and the stores of the outputs on one), and the hand-offs between them
// cost about as much as the arithmetic (docs/benchmarks.md). Here one call runs all T steps:
// per step one small matrix product (gemm below, with W_h packed once per call) and one pass of
// element-wise work, with nothing in between. Batch rows never interact, so the batch is cut
// into one block of rows per core and each thread runs the whole time loop on its block, with
// no synchronisation per step.
//
// Gates are ordered i, f, g, o (LSTM, G = 4H) and r, z, n (GRU, G = 3H); W_h is [G, H] (the
// recurrent product is h W_h^T). The forward loops store what the backward loops read, as the
// cells' step_saving does (a sigmoid is stored as t = tanh(x / 2), sigmoid(x) = (1 + t) / 2), so
// the backward loops recompute nothing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// C[R, N] (+)= A[R, K] B[K, N], B packed by pack(): panels of 32 columns, each [K][32]
// contiguous, zero-padded to a multiple of 32 columns. One panel (32 KB at K = 256) stays in L1
// while every block of 8 rows of A runs over it; 8 x 32 accumulators fit the vector registers.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kPanel = 32;

struct Packed {
  int64_t K = 0, N = 0;
  std::vector<float> data;  // [ceil(N / 32)][K][32]
};

// B[k][n] = src[k * k_stride + n * n_stride]
Packed pack(const float* src, int64_t K, int64_t N, int64_t k_stride, int64_t n_stride) {
  Packed p;
  p.K = K;
  p.N = N;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  p.data.assign(panels * K * kPanel, 0.0f);
  for (int64_t q = 0; q < panels; ++q)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kPanel && q * kPanel + j < N; ++j)
        p.data[(q * K + k) * kPanel + j] = src[k * k_stride + (q * kPanel + j) * n_stride];
  return p;
}

template <int ROWS>
inline void micro(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc,
                  int64_t cols, bool accumulate) {
  v16 acc0[ROWS], acc1[ROWS];
  for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const v16 b0 = *reinterpret_cast<const v16u*>(panel + k * kPanel);
    const v16 b1 = *reinterpret_cast<const v16u*>(panel + k * kPanel + 16);
    for (int r = 0; r < ROWS; ++r) {
      const float x = a[r * lda + k];
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    float* cr = c + r * ldc;
    if (cols == kPanel) {
      v16u* lo = reinterpret_cast<v16u*>(cr);
      v16u* hi = reinterpret_cast<v16u*>(cr + 16);
      *lo = accumulate ? *lo + acc0[r] : acc0[r];
      *hi = accumulate ? *hi + acc1[r] : acc1[r];
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        const float v = j < 16 ? acc0[r][j] : acc1[r][j - 16];
        cr[j] = accumulate ? cr[j] + v : v;
      }
    }
  }
}

void gemm(int64_t R, const float* a, int64_t lda, const Packed& b, float* c, int64_t ldc, bool accumulate) {
  const int64_t panels = (b.N + kPanel - 1) / kPanel;
  for (int64_t q = 0; q < panels; ++q) {
    const float* panel = b.data.data() + q * b.K * kPanel;
    const int64_t cols = std::min(kPanel, b.N - q * kPanel);
    float* cq = c + q * kPanel;
    int64_t r = 0;
    for (; r + 8 <= R; r += 8) micro<8>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate);
    switch (R - r) {
      case 7: micro<7>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate); break;
      case 6: micro<6>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate); break;
      case 5: micro<5>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate); break;
      case 4: micro<4>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate); break;
      case 3: micro<3>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate); break;
      case 2: micro<2>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate); break;
      case 1: micro<1>(a + r * lda, lda, panel, b.K, cq + r * ldc, ldc, cols, accumulate); break;
      default: break;
    }
  }
}

// tanh as Eigen's and XLA's CPU back end compute it (a [13/6] rational function on [-7.9, 7.9]),
// so that the loops vectorise; within 3e-7 of tanh.
inline float fast_tanh(float x) {
  const float c = 7.90531110763549805f;
  x = x < -c ? -c : (x > c ? c : x);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

// fn(row0, rows) over blocks of the B batch rows, one thread per block (the last on the caller)
template <typename Fn>
void over_row_blocks(int64_t B, Fn fn) {
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t n = std::max<int64_t>(1, std::min(cores, B / 8));
  if (n == 1) {
    fn(int64_t{0}, B);
    return;
  }
  std::vector<std::thread> threads;
  const int64_t per = (B + n - 1) / n;
  for (int64_t r0 = 0; r0 < B; r0 += per) {
    const int64_t rows = std::min(per, B - r0);
    if (r0 + per >= B) {
      fn(r0, rows);
    } else {
      threads.emplace_back([=] { fn(r0, rows); });
    }
  }
  for (auto& t : threads) t.join();
}

// one LSTM step's element-wise part for one batch row. t [G] holds the pre-activations on
// entry and their tanh on exit; c_prev, c, tc, h are [H].
void lstm_pointwise(int64_t H, float* __restrict t, const float* __restrict c_prev, float* __restrict c,
                    float* __restrict tc, float* __restrict h) {
  for (int64_t j = 0; j < 2 * H; ++j) t[j] = fast_tanh(0.5f * t[j]);
  for (int64_t j = 2 * H; j < 3 * H; ++j) t[j] = fast_tanh(t[j]);
  for (int64_t j = 3 * H; j < 4 * H; ++j) t[j] = fast_tanh(0.5f * t[j]);
  const float* ti = t;
  const float* tf = t + H;
  const float* tg = t + 2 * H;
  const float* to = t + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const float i = 0.5f * ti[j] + 0.5f, f = 0.5f * tf[j] + 0.5f, o = 0.5f * to[j] + 0.5f;
    const float cn = f * c_prev[j] + i * tg[j];
    const float tcn = fast_tanh(cn);
    c[j] = cn;
    tc[j] = tcn;
    h[j] = o * tcn;
  }
}

// Every sequence array is batch-major, [B, T, width] (recur.scan's layout): row (b, s) is
// b * T + s, so a block of rows at one step is strided by T rows (the gemm's lda / ldc).
// mask [B, T] (1 = a real step, 0 = padding): a padded step leaves the carry alone, so the
// kernels store the unchanged carry as that step's h (and c), which recur.scan then zeroes in
// the outputs; in the backward loop its cotangents pass straight through.

// The forward loop over us [B, T, G] from h0, c0 [B, H], writing hs [B, T, H]. kResiduals: also
// cs, tcs [B, T, H] (c_t, tanh(c_t)) and ts [B, T, G] (gate tanh) for the backward pass;
// otherwise (inference) each thread keeps its rows' pre-activations and cell states in buffers
// of its own and writes only c_T [B, H].
template <bool kResiduals>
void lstm_loop(int64_t B, int64_t T, int64_t G, const float* u, const Packed& w, const float* h0,
               const float* c0, const float* mask, float* hs_p, float* cs_p, float* tcs_p, float* ts_p,
               float* c_last) {
  const int64_t H = G / 4;
  over_row_blocks(B, [&](int64_t r0, int64_t R) {
    std::vector<float> pre_buf(kResiduals ? 0 : R * G), c_buf(kResiduals ? 0 : 2 * R * H), tc_buf(H);
    if (!kResiduals) std::memcpy(c_buf.data(), c0 + r0 * H, sizeof(float) * R * H);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t at = r0 * T + s;  // row (r0, s); row (r0 + b, s) is at + b * T
      const bool first = s == 0;
      const int64_t ld = first ? H : T * H;
      const float* h_prev = first ? h0 + r0 * H : hs_p + (at - 1) * H;
      // this step's pre-activations (overwritten by their tanh) and cell states, with row strides
      float* pre = kResiduals ? ts_p + at * G : pre_buf.data();
      const int64_t ld_pre = kResiduals ? T * G : G;
      const float* c_prev = kResiduals ? (first ? c0 + r0 * H : cs_p + (at - 1) * H) : c_buf.data() + (s % 2) * R * H;
      const int64_t ld_prev = kResiduals ? ld : H;
      float* c_new = kResiduals ? cs_p + at * H : c_buf.data() + ((s + 1) % 2) * R * H;
      const int64_t ld_new = kResiduals ? T * H : H;
      for (int64_t b = 0; b < R; ++b) std::memcpy(pre + b * ld_pre, u + (at + b * T) * G, sizeof(float) * G);
      gemm(R, h_prev, ld, w, pre, ld_pre, true);
      for (int64_t b = 0; b < R; ++b) {
        const int64_t k = at + b * T;
        float* tc = kResiduals ? tcs_p + k * H : tc_buf.data();
        lstm_pointwise(H, pre + b * ld_pre, c_prev + b * ld_prev, c_new + b * ld_new, tc, hs_p + k * H);
        if (mask[k] == 0.0f) {  // padding: the carry passes through
          std::memcpy(hs_p + k * H, h_prev + b * ld, sizeof(float) * H);
          std::memcpy(c_new + b * ld_new, c_prev + b * ld_prev, sizeof(float) * H);
        }
      }
    }
    if (!kResiduals) std::memcpy(c_last + r0 * H, c_buf.data() + (T % 2) * R * H, sizeof(float) * R * H);
  });
}

// forward: us [B, T, G], W_h [G, H], h0, c0 [B, H] ->
//   hs, cs, tcs [B, T, H] (h_t, c_t, tanh(c_t)), ts [B, T, G] (gate tanh)
ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> us, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> hs,
                           ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> tcs,
                           ffi::ResultBuffer<ffi::F32> ts) {
  auto d = us.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("recur LSTM kernel: us must be [B, T, 4H]");
  const int64_t H = d[2] / 4;
  const Packed w = pack(w_h.typed_data(), H, d[2], 1, H);  // B[k][n] = W_h[n][k]: pre += h W_h^T
  lstm_loop<true>(d[0], d[1], d[2], us.typed_data(), w, h0.typed_data(), c0.typed_data(), mask.typed_data(),
                  hs->typed_data(), cs->typed_data(), tcs->typed_data(), ts->typed_data(), nullptr);
  return ffi::Error::Success();
}

// inference: us [B, T, G], W_h [G, H], h0, c0 [B, H] -> hs [B, T, H], c_T [B, H]: the forward
// loop without the residuals the backward pass reads
ffi::Error LstmInferImpl(ffi::Buffer<ffi::F32> us, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0,
                         ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> hs,
                         ffi::ResultBuffer<ffi::F32> c_last) {
  auto d = us.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("recur LSTM kernel: us must be [B, T, 4H]");
  const int64_t H = d[2] / 4;
  const Packed w = pack(w_h.typed_data(), H, d[2], 1, H);
  lstm_loop<false>(d[0], d[1], d[2], us.typed_data(), w, h0.typed_data(), c0.typed_data(), mask.typed_data(),
                   hs->typed_data(), nullptr, nullptr, nullptr, c_last->typed_data());
  return ffi::Error::Success();
}

// backward: ts [B, T, G], tcs, cs_prev [B, T, H] (c_{t-1}), dhs [B, T, H], W_h [G, H], dh_T, dc_T [B, H]
//   -> dpre [B, T, G], dh0, dc0 [B, H]
ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> ts, ffi::Buffer<ffi::F32> tcs, ffi::Buffer<ffi::F32> cs_prev,
                            ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> dh_last,
                            ffi::Buffer<ffi::F32> dc_last, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> dpre,
                            ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0) {
  auto d = ts.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("recur LSTM kernel: ts must be [B, T, 4H]");
  const int64_t B = d[0], T = d[1], G = d[2], H = G / 4;
  float* dh_all = dh0->typed_data();  // running d h_t (through the recurrence), then d h_0
  float* dc_all = dc0->typed_data();  // running d c_t, then d c_0
  std::memcpy(dh_all, dh_last.typed_data(), sizeof(float) * B * H);
  std::memcpy(dc_all, dc_last.typed_data(), sizeof(float) * B * H);
  float* dp_all = dpre->typed_data();
  const Packed w = pack(w_h.typed_data(), G, H, H, 1);  // B[k][n] = W_h[k][n]: d h = d pre W_h
  over_row_blocks(B, [&](int64_t r0, int64_t R) {
    float* dh = dh_all + r0 * H;
    float* dc = dc_all + r0 * H;
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t at = r0 * T + s;
      for (int64_t b = 0; b < R; ++b) {
        const int64_t row = at + b * T;
        const float* tb = ts.typed_data() + row * G;
        const float* tc = tcs.typed_data() + row * H;
        const float* cp = cs_prev.typed_data() + row * H;
        const float* dh_out = dhs.typed_data() + row * H;
        float* dpb = dp_all + row * G;
        float* dhb = dh + b * H;
        float* dcb = dc + b * H;
        if (mask.typed_data()[row] == 0.0f) {  // padding: d pre = 0, d h and d c pass through
          std::memset(dpb, 0, sizeof(float) * G);
          for (int64_t j = 0; j < H; ++j) dhb[j] += dh_out[j];
          continue;
        }
        for (int64_t j = 0; j < H; ++j) {
          const float ti = tb[j], tf = tb[H + j], tg = tb[2 * H + j], to = tb[3 * H + j];
          const float i = 0.5f * ti + 0.5f, f = 0.5f * tf + 0.5f, o = 0.5f * to + 0.5f;
          const float dht = dhb[j] + dh_out[j];
          const float tck = tc[j];
          const float dct = dcb[j] + dht * o * (1.0f - tck * tck);
          dpb[j] = (0.25f * dct) * tg * (1.0f - ti * ti);
          dpb[H + j] = (0.25f * dct) * cp[j] * (1.0f - tf * tf);
          dpb[2 * H + j] = dct * i * (1.0f - tg * tg);
          dpb[3 * H + j] = (0.25f * dht) * tck * (1.0f - to * to);
          dcb[j] = dct * f;
          dhb[j] = 0.0f;  // h_{t-1} reaches h_t only through W_h
        }
      }
      // d h_{t-1} += d pre W_h (dh holds 0 after a real step, d h_t after padding)
      gemm(R, dp_all + at * G, T * G, w, dh, H, true);
    }
  });
  return ffi::Error::Success();
}

// ---- the reset-after GRU (gates r, z, n; W_h [3H, H], b_h [3H]) ----------------------------
// rec = h W_h^T + b_h; t = tanh((u + rec)_rz / 2); r, z = (1 + t) / 2;
// n = tanh(u_n + r rec_n); h = (1 - z) n + z h_prev (recur's GRU step_saving).

// The GRU's forward loop, writing hs [B, T, H]; kResiduals: also ts [B, T, 2H], ns and recns
// [B, T, H] for the backward pass (otherwise, for inference, the gate tanh goes to a buffer of
// the thread's own and n, rec_n are not stored).
template <bool kResiduals>
void gru_loop(int64_t B, int64_t T, int64_t G, const float* u_all, const Packed& w, const float* bias,
              const float* h0, const float* mask, float* hs_p, float* ts_p, float* ns_p, float* rn_p) {
  const int64_t H = G / 3;
  over_row_blocks(B, [&](int64_t r0, int64_t R) {
    std::vector<float> rec(R * G), t_buf(kResiduals ? 0 : 2 * H);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t at = r0 * T + s;
      const int64_t ld = s == 0 ? H : T * H;
      const float* h_prev = s == 0 ? h0 + r0 * H : hs_p + (at - 1) * H;
      gemm(R, h_prev, ld, w, rec.data(), G, false);
      for (int64_t b = 0; b < R; ++b) {
        const int64_t row = at + b * T;
        const float* u = u_all + row * G;
        const float* rb = rec.data() + b * G;
        const float* hp = h_prev + b * ld;
        float* t = kResiduals ? ts_p + row * 2 * H : t_buf.data();
        float* h = hs_p + row * H;
        for (int64_t j = 0; j < 2 * H; ++j) t[j] = fast_tanh(0.5f * (u[j] + rb[j] + bias[j]));
        for (int64_t j = 0; j < H; ++j) {
          const float r = 0.5f * t[j] + 0.5f, z = 0.5f * t[H + j] + 0.5f;
          const float recn = rb[2 * H + j] + bias[2 * H + j];
          const float nn = fast_tanh(u[2 * H + j] + r * recn);
          if (kResiduals) {
            rn_p[row * H + j] = recn;
            ns_p[row * H + j] = nn;
          }
          h[j] = (1.0f - z) * nn + z * hp[j];
        }
        if (mask[row] == 0.0f) std::memcpy(h, hp, sizeof(float) * H);  // padding
      }
    }
  });
}

// forward: us [B, T, 3H], W_h [3H, H], b_h [3H], h0 [B, H] ->
//   hs [B, T, H], ts [B, T, 2H] (r, z tanh), ns [B, T, H], recns [B, T, H] (rec_n)
ffi::Error GruForwardImpl(ffi::Buffer<ffi::F32> us, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b_h,
                          ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> ts,
                          ffi::ResultBuffer<ffi::F32> ns, ffi::ResultBuffer<ffi::F32> recns) {
  auto d = us.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("recur GRU kernel: us must be [B, T, 3H]");
  const int64_t H = d[2] / 3;
  const Packed w = pack(w_h.typed_data(), H, d[2], 1, H);  // rec = h W_h^T
  gru_loop<true>(d[0], d[1], d[2], us.typed_data(), w, b_h.typed_data(), h0.typed_data(), mask.typed_data(),
                 hs->typed_data(), ts->typed_data(), ns->typed_data(), recns->typed_data());
  return ffi::Error::Success();
}

// inference: us [B, T, 3H], W_h [3H, H], b_h [3H], h0 [B, H] -> hs [B, T, H], without residuals
ffi::Error GruInferImpl(ffi::Buffer<ffi::F32> us, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b_h,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> hs) {
  auto d = us.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("recur GRU kernel: us must be [B, T, 3H]");
  const int64_t H = d[2] / 3;
  const Packed w = pack(w_h.typed_data(), H, d[2], 1, H);
  gru_loop<false>(d[0], d[1], d[2], us.typed_data(), w, b_h.typed_data(), h0.typed_data(), mask.typed_data(),
                  hs->typed_data(), nullptr, nullptr, nullptr);
  return ffi::Error::Success();
}

// backward: ts [B, T, 2H], ns, recns, hs_prev (h_{t-1}), dhs [B, T, H], W_h [3H, H], dh_T [B, H]
//   -> du [B, T, 3H], drec [B, T, 3H], dh0 [B, H]
ffi::Error GruBackwardImpl(ffi::Buffer<ffi::F32> ts, ffi::Buffer<ffi::F32> ns, ffi::Buffer<ffi::F32> recns,
                           ffi::Buffer<ffi::F32> hs_prev, ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> w_h,
                           ffi::Buffer<ffi::F32> dh_last, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> du,
                           ffi::ResultBuffer<ffi::F32> drec, ffi::ResultBuffer<ffi::F32> dh0) {
  auto d = ns.dimensions();
  if (d.size() != 3) return ffi::Error::InvalidArgument("recur GRU kernel: ns must be [B, T, H]");
  const int64_t B = d[0], T = d[1], H = d[2], G = 3 * H;
  const Packed w = pack(w_h.typed_data(), G, H, H, 1);  // d h += d rec W_h
  float* dh_all = dh0->typed_data();
  std::memcpy(dh_all, dh_last.typed_data(), sizeof(float) * B * H);
  float* du_p = du->typed_data();
  float* dr_p = drec->typed_data();
  over_row_blocks(B, [&](int64_t r0, int64_t R) {
    float* dh = dh_all + r0 * H;
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t at = r0 * T + s;
      for (int64_t b = 0; b < R; ++b) {
        const int64_t row = at + b * T;
        const float* t = ts.typed_data() + row * 2 * H;
        const float* n = ns.typed_data() + row * H;
        const float* rn = recns.typed_data() + row * H;
        const float* hp = hs_prev.typed_data() + row * H;
        const float* dho = dhs.typed_data() + row * H;
        float* dub = du_p + row * G;
        float* drb = dr_p + row * G;
        float* dhb = dh + b * H;
        if (mask.typed_data()[row] == 0.0f) {  // padding: d u = d rec = 0, d h passes through
          std::memset(dub, 0, sizeof(float) * G);
          std::memset(drb, 0, sizeof(float) * G);
          for (int64_t j = 0; j < H; ++j) dhb[j] += dho[j];
          continue;
        }
        for (int64_t j = 0; j < H; ++j) {
          const float tr = t[j], tz = t[H + j];
          const float r = 0.5f * tr + 0.5f, z = 0.5f * tz + 0.5f;
          const float dd = dhb[j] + dho[j];
          const float dun = dd * (1.0f - z) * (1.0f - n[j] * n[j]);
          const float dur = dun * rn[j] * (0.25f * (1.0f - tr * tr));
          const float duz = dd * (hp[j] - n[j]) * (0.25f * (1.0f - tz * tz));
          dub[j] = dur;
          dub[H + j] = duz;
          dub[2 * H + j] = dun;
          drb[j] = dur;
          drb[H + j] = duz;
          drb[2 * H + j] = r * dun;
          dhb[j] = dd * z;  // d h_{t-1} through z; the W_h path is added below
        }
      }
      gemm(R, dr_p + at * G, T * G, w, dh, H, true);
    }
  });
  return ffi::Error::Success();
}


// ---- the linear recurrence s_t = a_t s_{t-1} + b_t (minGRU, minLSTM and any real cell in the
// (a, b) form), batch-major [B, T, S], s_{-1} = 0 (recur.scan folds the carry into (a, b)).
//
// Memory-bound, so the aim is to stream each array once: a thread takes a run of (row, time
// chunk) items and walks each item's steps in order, the state in a buffer of S floats. With one
// chunk per row (enough rows for every core) that is one pass. Otherwise (few rows, long T) each
// row's time axis is cut into C chunks, and the scan runs in parallel over time in three passes,
// as the GPU kernel (recur/kernels/linear.py) does: (1) every chunk but the last folds its steps
// into an affine map s_out = P s_in + Q, (2) the maps are combined in order per row, (3) every
// chunk reruns its steps from its true entering state, writing the outputs.
//
// The backward pass is the same recurrence read from the end: with e the cotangent of s,
// e_t = g_t + a_{t+1} e_{t+1}, db_t = e_t and da_t = e_t s_{t-1}.

// fn(begin, end) over [0, n) cut into one contiguous block per core (the last on the caller)
template <typename Fn>
void parallel_for(int64_t n, Fn fn) {
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t workers = std::max<int64_t>(1, std::min(cores, n));
  const int64_t per = (n + workers - 1) / workers;
  std::vector<std::thread> threads;
  for (int64_t i0 = 0; i0 < n; i0 += per) {
    const int64_t i1 = std::min(n, i0 + per);
    if (i1 >= n) {
      fn(i0, i1);
    } else {
      threads.emplace_back([=] { fn(i0, i1); });
    }
  }
  for (auto& t : threads) t.join();
}

// time chunks per row: the `chunks` attribute if positive, else 1 when the rows alone give every
// core work, else enough chunks (of at least 64 steps) for the cores
int64_t time_chunks(int64_t B, int64_t T, int64_t chunks) {
  if (chunks > 0) return std::max<int64_t>(1, std::min(chunks, T));
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  if (B >= cores) return 1;
  return std::max<int64_t>(1, std::min((cores + B - 1) / B, T / 64));
}

// The three passes over items (row r, chunk c) of steps [t0, t1), in time order or, with
// `reverse`, from the end. init(r, state) sets the state entering row r's first chunk in reading
// order. step(r, t, state, p, write) advances the state over step t (state = a_t state + b_t);
// in pass 1 (p not null) it also multiplies p by a_t and writes nothing, in pass 3 (`write`)
// it writes step t's outputs.
template <typename Init, typename Step>
void three_pass(int64_t B, int64_t T, int64_t S, int64_t C, bool reverse, Init init, Step step) {
  if (B == 0 || T == 0) return;
  const int64_t L = (T + C - 1) / C;
  C = (T + L - 1) / L;  // no empty chunk
  std::vector<float> entering(B * C * S, 0.0f);
  for (int64_t r = 0; r < B; ++r) init(r, entering.data() + (r * C + (reverse ? C - 1 : 0)) * S);
  if (C > 1) {
    std::vector<float> P(B * C * S), Q(B * C * S);
    // pass 1: each chunk's affine map from zero (the last chunk in reading order needs none)
    parallel_for(B * C, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i / C, c = i % C;
        if (c == (reverse ? 0 : C - 1)) continue;
        float* p = P.data() + i * S;
        float* q = Q.data() + i * S;
        std::fill(p, p + S, 1.0f);
        std::fill(q, q + S, 0.0f);
        const int64_t t0 = c * L, t1 = std::min(T, t0 + L);
        for (int64_t k = 0; k < t1 - t0; ++k) step(r, reverse ? t1 - 1 - k : t0 + k, q, p, false);
      }
    });
    // pass 2: the entering state of every chunk, in reading order
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 1; k < C; ++k) {
        const int64_t c = reverse ? C - 1 - k : k, prev = reverse ? c + 1 : c - 1;
        float* e = entering.data() + (r * C + c) * S;
        const float* ep = entering.data() + (r * C + prev) * S;
        const float* p = P.data() + (r * C + prev) * S;
        const float* q = Q.data() + (r * C + prev) * S;
        for (int64_t j = 0; j < S; ++j) e[j] = p[j] * ep[j] + q[j];
      }
  }
  // pass 3: every chunk from its entering state, writing the outputs
  parallel_for(B * C, [&](int64_t i0, int64_t i1) {
    std::vector<float> state(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / C, c = i % C;
      std::copy(entering.data() + i * S, entering.data() + (i + 1) * S, state.data());
      const int64_t t0 = c * L, t1 = std::min(T, t0 + L);
      for (int64_t k = 0; k < t1 - t0; ++k) step(r, reverse ? t1 - 1 - k : t0 + k, state.data(), nullptr, true);
    }
  });
}

ffi::Error LinearForwardImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> s,
                             int64_t chunks) {
  const auto dims = a.dimensions();
  const int64_t B = dims[0], T = dims[1], S = dims[2];
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* sp = s->typed_data();
  auto init = [](int64_t, float*) {};
  auto step = [&](int64_t r, int64_t t, float* __restrict state, float* __restrict p, bool write) {
    const float* __restrict at = ap + (r * T + t) * S;
    const float* __restrict bt = bp + (r * T + t) * S;
    if (write) {
      float* __restrict out = sp + (r * T + t) * S;
      for (int64_t j = 0; j < S; ++j) out[j] = state[j] = at[j] * state[j] + bt[j];
    } else {
      for (int64_t j = 0; j < S; ++j) {
        state[j] = at[j] * state[j] + bt[j];
        p[j] *= at[j];
      }
    }
  };
  three_pass(B, T, S, time_chunks(B, T, chunks), false, init, step);
  return ffi::Error::Success();
}

// a, s (the forward states), g (their cotangent) -> da, db. The state carried backwards is
// a_{t+1} e_{t+1}; step t turns it into e_t = g_t + carry, writes db_t = e_t and
// da_t = e_t s_{t-1}, and carries a_t e_t on.
ffi::Error LinearBackwardImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> g,
                              ffi::ResultBuffer<ffi::F32> da, ffi::ResultBuffer<ffi::F32> db, int64_t chunks) {
  const auto dims = a.dimensions();
  const int64_t B = dims[0], T = dims[1], S = dims[2];
  const float* ap = a.typed_data();
  const float* sp = s.typed_data();
  const float* gp = g.typed_data();
  float* dap = da->typed_data();
  float* dbp = db->typed_data();
  auto init = [](int64_t, float*) {};
  auto step = [&](int64_t r, int64_t t, float* __restrict carry, float* __restrict p, bool write) {
    const int64_t at = (r * T + t) * S;
    const float* __restrict a_t = ap + at;
    const float* __restrict g_t = gp + at;
    if (!write) {
      for (int64_t j = 0; j < S; ++j) {
        carry[j] = a_t[j] * (g_t[j] + carry[j]);
        p[j] *= a_t[j];
      }
      return;
    }
    float* __restrict da_t = dap + at;
    float* __restrict db_t = dbp + at;
    const float* __restrict s_prev = t > 0 ? sp + at - S : nullptr;
    for (int64_t j = 0; j < S; ++j) {
      const float e = g_t[j] + carry[j];
      db_t[j] = e;
      da_t[j] = t > 0 ? e * s_prev[j] : 0.0f;
      carry[j] = a_t[j] * e;
    }
  };
  three_pass(B, T, S, time_chunks(B, T, chunks), true, init, step);
  return ffi::Error::Success();
}

// ---- minGRU and minLSTM (Feng et al. 2024) with their gates computed inside the scan: the
// kernels read the projected inputs u [B, T, k S] (k = 2: pre_z | pre_h; k = 3: pre_f | pre_i |
// pre_h) instead of (a, b), so the gates cost no pass over memory of their own, and the backward
// pass recomputes them rather than storing them. Kinds: 1 minGRU, 2 minGRU with the identity
// candidate, 3 minLSTM, 4 minLSTM identity (recur/cells/minrnn.py):
//   minGRU:  z = sigmoid(pre_z), a = 1 - z, b = z c;
//   minLSTM: f = sigmoid(pre_f), i = sigmoid(pre_i), a = f / (f + i), b = i / (f + i) c;
//   c = g(pre_h) = pre_h + 1/2 where pre_h >= 0, else sigmoid(pre_h) (or pre_h itself).
// The state starts from s0 [B, S]; at a padded step (mask 0) a = 1, b = 0: the state passes
// through, and the step's inputs get no gradient.

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// The candidate c = g(x) (or x) and its derivative. Both sides of the select are computed, so
// the loops below vectorise.
template <bool G>
inline float cand(float x) {
  return G ? (x >= 0.0f ? x + 0.5f : sigmoid(x)) : x;
}
template <bool G>
inline float cand_grad(float x) {
  if (!G) return 1.0f;
  const float sg = sigmoid(x);
  return x >= 0.0f ? 1.0f : sg * (1.0f - sg);
}

// One step of one batch row, all S units, for kind Kind: forward (state = a state + b, and
// either out = state or p *= a) and backward (from e = g + carry: d u, and carry = a e).
template <int Kind>
struct Gated {
  static constexpr int64_t k = Kind <= 2 ? 2 : 3;
  static constexpr bool G = Kind == 1 || Kind == 3;

  static inline void forward(const float* __restrict u, int64_t S, float* __restrict state, float* __restrict out,
                             float* __restrict p) {
    const float* __restrict u0 = u;
    const float* __restrict u1 = u + S;
    const float* __restrict u2 = u + 2 * S;
    if (out) {
      for (int64_t j = 0; j < S; ++j) {
        float a, b;
        ab(u0[j], u1[j], k == 3 ? u2[j] : 0.0f, a, b);
        out[j] = state[j] = a * state[j] + b;
      }
    } else {
      for (int64_t j = 0; j < S; ++j) {
        float a, b;
        ab(u0[j], u1[j], k == 3 ? u2[j] : 0.0f, a, b);
        state[j] = a * state[j] + b;
        p[j] *= a;
      }
    }
  }

  static inline void ab(float x0, float x1, float x2, float& a, float& b) {
    if (k == 2) {
      const float z = sigmoid(x0);
      a = 1.0f - z;
      b = z * cand<G>(x1);
    } else {
      const float f = sigmoid(x0), i = sigmoid(x1);
      const float inv = 1.0f / (f + i);
      a = f * inv;
      b = i * inv * cand<G>(x2);
    }
  }

  static inline void backward(const float* __restrict u, int64_t S, const float* __restrict g,
                              const float* __restrict s_prev, float* __restrict carry, float* __restrict du) {
    const float* __restrict u0 = u;
    const float* __restrict u1 = u + S;
    const float* __restrict u2 = u + 2 * S;
    float* __restrict d0 = du;
    float* __restrict d1 = du + S;
    float* __restrict d2 = du + 2 * S;
    for (int64_t j = 0; j < S; ++j) {
      const float e = g[j] + carry[j];
      const float da = e * s_prev[j];  // d b = e
      if (k == 2) {
        const float z = sigmoid(u0[j]), c = cand<G>(u1[j]);
        d0[j] = (e * c - da) * z * (1.0f - z);
        d1[j] = e * z * cand_grad<G>(u1[j]);
        carry[j] = (1.0f - z) * e;
      } else {
        // b = i / (f + i) c = (1 - a) c, so f and i see d a - d b c through a = f / (f + i):
        // d a / d f = i / (f + i)^2, d a / d i = -f / (f + i)^2
        const float f = sigmoid(u0[j]), i = sigmoid(u1[j]), c = cand<G>(u2[j]);
        const float inv = 1.0f / (f + i);
        const float d = (da - e * c) * inv * inv;
        d0[j] = d * i * f * (1.0f - f);
        d1[j] = -d * f * i * (1.0f - i);
        d2[j] = e * i * inv * cand_grad<G>(u2[j]);
        carry[j] = f * inv * e;
      }
    }
  }
};

template <int Kind>
void gated_forward(int64_t B, int64_t T, int64_t S, const float* up, const float* s0, const float* mask, float* sp,
                   int64_t chunks) {
  constexpr int64_t k = Gated<Kind>::k;
  auto init = [&](int64_t r, float* state) { std::copy(s0 + r * S, s0 + (r + 1) * S, state); };
  auto step = [&](int64_t r, int64_t t, float* state, float* p, bool write) {
    const int64_t row = r * T + t;
    if (mask[row] == 0.0f) {  // a = 1, b = 0
      if (write) std::copy(state, state + S, sp + row * S);
      return;
    }
    Gated<Kind>::forward(up + row * k * S, S, state, write ? sp + row * S : nullptr, p);
  };
  three_pass(B, T, S, time_chunks(B, T, chunks), false, init, step);
}

// u, s0, s (the forward states), g (their cotangent), mask -> du, ds0
template <int Kind>
void gated_backward(int64_t B, int64_t T, int64_t S, const float* up, const float* s0, const float* sp,
                    const float* gp, const float* mask, float* dup, float* ds0, int64_t chunks) {
  constexpr int64_t k = Gated<Kind>::k;
  auto init = [](int64_t, float*) {};
  auto step = [&](int64_t r, int64_t t, float* __restrict carry, float* __restrict p, bool write) {
    const int64_t row = r * T + t;
    const float* __restrict g_t = gp + row * S;
    const float* u = up + row * k * S;
    if (mask[row] == 0.0f) {  // a = 1: the carry gathers g_t and passes on; no gradient to u
      for (int64_t j = 0; j < S; ++j) carry[j] += g_t[j];
      if (write) std::fill(dup + row * k * S, dup + (row + 1) * k * S, 0.0f);
    } else if (!write) {
      for (int64_t j = 0; j < S; ++j) {
        float a, b;
        Gated<Kind>::ab(u[j], u[S + j], k == 3 ? u[2 * S + j] : 0.0f, a, b);
        carry[j] = a * (g_t[j] + carry[j]);
        p[j] *= a;
      }
    } else {
      Gated<Kind>::backward(u, S, g_t, t > 0 ? sp + (row - 1) * S : s0 + r * S, carry, dup + row * k * S);
    }
    if (write && t == 0) std::copy(carry, carry + S, ds0 + r * S);
  };
  three_pass(B, T, S, time_chunks(B, T, chunks), true, init, step);
}

ffi::Error GatedForwardImpl(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> s0, ffi::Buffer<ffi::F32> mask,
                            ffi::ResultBuffer<ffi::F32> s, int64_t kind, int64_t chunks) {
  const auto dims = s->dimensions();
  const int64_t B = dims[0], T = dims[1], S = dims[2];
  const float *up = u.typed_data(), *s0p = s0.typed_data(), *mp = mask.typed_data();
  float* sp = s->typed_data();
  switch (kind) {
    case 1: gated_forward<1>(B, T, S, up, s0p, mp, sp, chunks); break;
    case 2: gated_forward<2>(B, T, S, up, s0p, mp, sp, chunks); break;
    case 3: gated_forward<3>(B, T, S, up, s0p, mp, sp, chunks); break;
    case 4: gated_forward<4>(B, T, S, up, s0p, mp, sp, chunks); break;
    default: return ffi::Error(ffi::ErrorCode::kInvalidArgument, "recur_gated_forward: kind must be 1..4");
  }
  return ffi::Error::Success();
}

ffi::Error GatedBackwardImpl(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> s0, ffi::Buffer<ffi::F32> s,
                             ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> mask, ffi::ResultBuffer<ffi::F32> du,
                             ffi::ResultBuffer<ffi::F32> ds0, int64_t kind, int64_t chunks) {
  const auto dims = s.dimensions();
  const int64_t B = dims[0], T = dims[1], S = dims[2];
  const float *up = u.typed_data(), *s0p = s0.typed_data(), *sp = s.typed_data(), *gp = g.typed_data(),
              *mp = mask.typed_data();
  float *dup = du->typed_data(), *ds0p = ds0->typed_data();
  if (T == 0) std::fill(ds0p, ds0p + B * S, 0.0f);
  switch (kind) {
    case 1: gated_backward<1>(B, T, S, up, s0p, sp, gp, mp, dup, ds0p, chunks); break;
    case 2: gated_backward<2>(B, T, S, up, s0p, sp, gp, mp, dup, ds0p, chunks); break;
    case 3: gated_backward<3>(B, T, S, up, s0p, sp, gp, mp, dup, ds0p, chunks); break;
    case 4: gated_backward<4>(B, T, S, up, s0p, sp, gp, mp, dup, ds0p, chunks); break;
    default: return ffi::Error(ffi::ErrorCode::kInvalidArgument, "recur_gated_backward: kind must be 1..4");
  }
  return ffi::Error::Success();
}

}  // namespace

// us, W_h, h0, c0, mask -> hs, cs, tcs, ts
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// us, W_h, h0, c0, mask -> hs, c_T
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurLstmInfer, LstmInferImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ts, tcs, cs_prev, dhs, W_h, dh_T, dc_T, mask -> dpre, dh0, dc0
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// us, W_h, b_h, h0, mask -> hs, ts, ns, recns
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// us, W_h, b_h, h0, mask -> hs
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurGruInfer, GruInferImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ts, ns, recns, hs_prev, dhs, W_h, dh_T, mask -> du, drec, dh0
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurGruBackward, GruBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// a, b -> s; attribute chunks (time chunks per row, 0: choose)
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurLinearForward, LinearForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("chunks"));

// a, s, g -> da, db; attribute chunks
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurLinearBackward, LinearBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("chunks"));

// u, s0, mask -> s; attributes kind (1..4, see Gates), chunks
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurGatedForward, GatedForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("chunks"));

// u, s0, s, g, mask -> du, ds0; attributes kind, chunks
XLA_FFI_DEFINE_HANDLER_SYMBOL(RecurGatedBackward, GatedBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("chunks"));
