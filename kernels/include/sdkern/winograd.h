// Winograd F(2x2, 3x3) transforms for 3x3 stride-1 convolutions with zero padding 1 (CPU, float32).
//
// The convolution y = conv3x3(x) + bias (+ other) runs as
//   V = winograd_input(x)            (16, T, C):    V[4a+b][t] = (Bt d_t B)[a][b], d_t the t-th 4x4 input tile
//   M[k] = V[k] @ U[k], k = 0..15    (16, T, K):    one batched GEMM by the caller, U = G g Gt (16, C, K)
//   y = winograd_output(M)           (N, K, H, W):  (At M_t A) for the t-th 2x2 output tile, + bias (+ other)
// with Bt = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]] and At = [[1,1,1,0],[0,1,-1,-1]].
//
// Tiles: TH = ceil(H/2), TW = ceil(W/2), T = N*TH*TW; tile t = (n*TH + ty)*TW + tx covers output rows
// 2ty, 2ty+1 and columns 2tx, 2tx+1, and input rows 2ty-1 .. 2ty+2, columns 2tx-1 .. 2tx+2 (zero outside
// the image: the padding, and the missing row/column of a partial tile when H or W is odd).
//
// Layout: activations are channels-last (channel stride 1), the layout of sdkern's CPU engine; the
// other strides are free. Any other layout is rejected with kInvalidArgument (the Python side converts).
// Neither op allocates: the caller provides every output.
#pragma once

#include "sdkern/common.h"

namespace sdkern {

struct WinogradInputArgs {
  const void* x = nullptr;  // (N, C, H, W): element (n, c, h, w) at x[n*x_sn + c*x_sc + h*x_sh + w*x_sw], x_sc = 1
  void* v = nullptr;        // (16, T, C) contiguous output: V[k][t][c] at v[(k*T + t)*C + c]
  int64_t N = 0, C = 0, H = 0, W = 0;
  int64_t x_sn = 0, x_sc = 1, x_sh = 0, x_sw = 0;
  DType dtype = DType::kFloat32;  // float32 only
};

struct WinogradOutputArgs {
  const void* m = nullptr;      // (16, T, K) contiguous: M[k][t][o] at m[(k*T + t)*K + o]
  const void* bias = nullptr;   // optional [K] contiguous
  const void* other = nullptr;  // optional (N, K, H, W) residual: (n, o, h, w) at other[n*o_sn + o*o_sc + h*o_sh + w*o_sw], o_sc = 1
  void* y = nullptr;            // (N, K, H, W) channels-last contiguous output: (n, o, h, w) at y[((n*H + h)*W + w)*K + o]
  int64_t N = 0, K = 0, H = 0, W = 0;
  int64_t o_sn = 0, o_sc = 1, o_sh = 0, o_sw = 0;
  DType dtype = DType::kFloat32;  // float32 only (m, bias, other and y)
};

// Number of 4x4 input / 2x2 output tiles for an (N, ., H, W) activation.
inline int64_t winograd_tiles(int64_t N, int64_t H, int64_t W) { return N * ((H + 1) / 2) * ((W + 1) / 2); }

Status validate(const WinogradInputArgs& a);
Status validate(const WinogradOutputArgs& a);
Status winograd_input_cpu(const WinogradInputArgs& a);
Status winograd_output_cpu(const WinogradOutputArgs& a);

}  // namespace sdkern
