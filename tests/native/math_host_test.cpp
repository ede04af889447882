// Host driver for tests/native/test_math_host.py: runs the SDKERN_HD helpers of sdkern/math.h (the
// same code the CUDA and CPU kernels use) and writes raw results for the Python side to compare
// with numpy / torch references.
//   math_host_test IN.f32 OUTDIR
// IN.f32: float32 values. Outputs in OUTDIR (raw little-endian):
//   f16_decode.f32, bf16_decode.f32   f16_to_f32 / bf16_to_f32 of all 65536 bit patterns
//   f16_encode.u16, bf16_encode.u16   f32_to_f16 / f32_to_bf16 of every input
//   silu.f32, gelu.f32                activations of every input
//   moments.f32                       (n, mean, m2) of the first 100000 inputs merged from uneven chunks two ways:
//                                     left fold of Chan combines, then a pairwise tree
#include <cstdio>
#include <string>
#include <vector>

#include "sdkern/math.h"

using namespace sdkern::math;

template <typename T>
static bool write_raw(const std::string& path, const std::vector<T>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const size_t n = std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
  return n == v.size();
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN.f32 OUTDIR\n", argv[0]);
    return 2;
  }
  std::vector<float> in;
  {
    FILE* f = std::fopen(argv[1], "rb");
    if (!f) return 3;
    float buf[4096];
    size_t n;
    while ((n = std::fread(buf, 4, 4096, f)) > 0) in.insert(in.end(), buf, buf + n);
    std::fclose(f);
  }
  const std::string out = argv[2];

  std::vector<float> f16d(65536), bf16d(65536);
  for (uint32_t i = 0; i < 65536; ++i) {
    f16d[i] = f16_to_f32(static_cast<uint16_t>(i));
    bf16d[i] = bf16_to_f32(static_cast<uint16_t>(i));
  }
  std::vector<uint16_t> f16e(in.size()), bf16e(in.size());
  std::vector<float> si(in.size()), ge(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    f16e[i] = f32_to_f16(in[i]);
    bf16e[i] = f32_to_bf16(in[i]);
    si[i] = silu(in[i]);
    ge[i] = gelu_erf(in[i]);
  }

  // Moments of the first kMomentCount inputs (the caller puts plain random data there): uneven
  // chunks (sizes 1, 2, ..., 97, repeating), per chunk the
  // shifted sums about a common pivot (the first value), as the CUDA group-norm stats pass does.
  const size_t kMomentCount = 100000;
  std::vector<float> vals(in.begin(), in.begin() + (in.size() < kMomentCount ? in.size() : kMomentCount));
  std::vector<Moments> parts;
  const float pivot = vals.empty() ? 0.0f : vals[0];
  size_t pos = 0;
  for (size_t len = 1; pos < vals.size(); len = len % 97 + 1) {
    const size_t end = pos + len < vals.size() ? pos + len : vals.size();
    float s = 0.0f, q = 0.0f;
    for (size_t i = pos; i < end; ++i) {
      const float d = vals[i] - pivot;
      s += d;
      q += d * d;
    }
    parts.push_back(moments_from_shifted_sums(static_cast<float>(end - pos), s, q, pivot));
    pos = end;
  }
  Moments fold{0.0f, 0.0f, 0.0f};
  for (const Moments& m : parts) fold = moments_combine(fold, m);
  std::vector<Moments> tree = parts;
  while (tree.size() > 1) {
    std::vector<Moments> next;
    for (size_t i = 0; i < tree.size(); i += 2)
      next.push_back(i + 1 < tree.size() ? moments_combine(tree[i], tree[i + 1]) : tree[i]);
    tree.swap(next);
  }
  const Moments t = tree.empty() ? Moments{0.0f, 0.0f, 0.0f} : tree[0];
  std::vector<float> mom = {fold.n, fold.mean, fold.m2, t.n, t.mean, t.m2};

  bool ok = write_raw(out + "/f16_decode.f32", f16d) && write_raw(out + "/bf16_decode.f32", bf16d) &&
            write_raw(out + "/f16_encode.u16", f16e) && write_raw(out + "/bf16_encode.u16", bf16e) &&
            write_raw(out + "/silu.f32", si) && write_raw(out + "/gelu.f32", ge) &&
            write_raw(out + "/moments.f32", mom);
  return ok ? 0 : 4;
}
