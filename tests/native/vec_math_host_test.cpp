// Host driver for tests/native/test_vec_math_host.py: runs the scalar math of the CPU kernels
// (kernels/cpu/vec_math.h: exp, erf, erf-GELU; the tails of every SIMD loop and the baseline ISA level)
// on the values of a file and writes the raw results. Built with UBSan by the test, so undefined behaviour
// on special inputs (NaN, +-inf, huge values) aborts it.
//   vec_math_host_test IN.f32 OUT.f32
// IN.f32: n float32 values. OUT.f32: 3n float32 values: exp(x) for all x, then erf(x), then gelu_erf(x).
#include <cstdio>
#include <vector>

#include "vec_math.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN.f32 OUT.f32\n", argv[0]);
    return 2;
  }
  std::vector<float> in;
  if (FILE* f = std::fopen(argv[1], "rb")) {
    float buf[4096];
    size_t got;
    while ((got = std::fread(buf, sizeof(float), 4096, f)) > 0) in.insert(in.end(), buf, buf + got);
    std::fclose(f);
  } else {
    std::fprintf(stderr, "cannot read %s\n", argv[1]);
    return 1;
  }
  namespace vm = sdkern::cpu::vm;
  std::vector<float> out;
  out.reserve(3 * in.size());
  for (float x : in) out.push_back(vm::exp(x));
  for (float x : in) out.push_back(vm::erf(x));
  for (float x : in) out.push_back(vm::gelu_erf(x));
  FILE* f = std::fopen(argv[2], "wb");
  if (!f) return 1;
  const size_t n = std::fwrite(out.data(), sizeof(float), out.size(), f);
  std::fclose(f);
  return n == out.size() ? 0 : 1;
}
