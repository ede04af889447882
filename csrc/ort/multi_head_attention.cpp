// MultiHeadAttention (domain sdkern, semantics of com.microsoft MultiHeadAttention) for the forms
// Stable Diffusion uses; every form maps onto AttentionArgs strides, nothing is copied.
//   attrs:   num_heads (int, required), scale (float, default 0 = 1/sqrt(head size)),
//            unidirectional (int 0 or 1, default 0; 1 = causal: query i sees keys j <= i + L - S, the
//            past-aligned mask of ORT's own kernel; needs S <= L), mask_filter_value (ignored: masks unsupported)
//   inputs:  query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value,
//            past_sequence_length, cache_indirection (all but query optional; only query/key/value
//            may be given, anything else is a clear error)
//            forms: query (B, S, N*H), key (B, L, N*H), value (B, L, N*Hv)
//                   packed QKV: query (B, S, N, 3, H), no key/value
//                   packed KV:  query (B, S, N*H), key (B, L, N, 2, H), no value
//   outputs: output (B, S, N*Hv); present_key / present_value / qk are not supported (error if asked)
#include <cmath>

#include "ort_common.h"
#include "sdkern/attention.h"

namespace sdkern_ort {
namespace {

constexpr const char* kOp = "MultiHeadAttention";
const char* const kInputNames[] = {"query",           "key",           "value",      "bias",
                                   "key_padding_mask", "attention_bias", "past_key",   "past_value",
                                   "past_sequence_length", "cache_indirection"};
const char* const kOutputNames[] = {"output", "present_key", "present_value", "qk"};

// Whether input `index` is given (without reading it).
OrtStatus* has_input(OrtKernelContext* ctx, size_t index, bool* out) {
  size_t count = 0;
  SDKERN_ORT_TRY(api().KernelContext_GetInputCount(ctx, &count));
  const OrtValue* v = nullptr;
  if (index < count) SDKERN_ORT_TRY(api().KernelContext_GetInput(ctx, index, &v));
  *out = v != nullptr;
  return nullptr;
}

std::string err_prefix() { return "sdkern.MultiHeadAttention: "; }

class MhaKernel : public Kernel {
 public:
  MhaKernel(int64_t heads, float scale, bool causal, Ep ep) : heads_(heads), scale_(scale), causal_(causal), ep_(ep) {}

  OrtStatus* compute(OrtKernelContext* ctx) override {
    for (size_t i = 3; i < 10; ++i) {
      bool given = false;
      SDKERN_ORT_TRY(has_input(ctx, i, &given));
      if (given)
        return error(err_prefix() + "optional input '" + kInputNames[i] +
                     "' is not supported (only query, key and value; fold biases into the projections)",
                     ORT_NOT_IMPLEMENTED);
    }
    TensorView q, k, v, o;
    SDKERN_ORT_TRY(input(ctx, 0, kOp, "query", true, &q));
    SDKERN_ORT_TRY(input(ctx, 1, kOp, "key", false, &k));
    SDKERN_ORT_TRY(input(ctx, 2, kOp, "value", false, &v));
    if ((k.present() && k.type != q.type) || (v.present() && v.type != q.type))
      return error(err_prefix() + "query, key and value must have the same type");

    const int64_t N = heads_;
    const size_t es = elem_size(q.dtype);
    sdkern::AttentionArgs a;
    a.H = N;
    a.dtype = q.dtype;
    if (q.rank() == 5) {  // packed QKV (B, S, N, 3, H)
      if (k.present() || v.present())
        return error(err_prefix() + "packed QKV query (B, S, N, 3, H) takes no key/value inputs");
      if (q.shape[2] != N || q.shape[3] != 3)
        return error(err_prefix() + "packed QKV query must be (B, S, num_heads=" + std::to_string(N) +
                     ", 3, H), got " + shape_str(q.shape));
      const int64_t B = q.shape[0], S = q.shape[1], H = q.shape[4];
      a.B = B;
      a.Sq = a.Sk = S;
      a.D = a.Dv = H;
      a.q_sb = a.k_sb = a.v_sb = S * N * 3 * H;
      a.q_ss = a.k_ss = a.v_ss = N * 3 * H;
      a.q_sh = a.k_sh = a.v_sh = 3 * H;
      a.q = q.data;
      a.k = static_cast<const char*>(q.data) + H * es;
      a.v = static_cast<const char*>(q.data) + 2 * H * es;
    } else if (q.rank() == 3) {
      const int64_t B = q.shape[0], S = q.shape[1], Dq = q.shape[2];
      if (Dq % N != 0)
        return error(err_prefix() + "query hidden size " + std::to_string(Dq) + " is not divisible by num_heads=" +
                     std::to_string(N));
      const int64_t H = Dq / N;
      a.B = B;
      a.Sq = S;
      a.D = H;
      a.q = q.data;
      a.q_sb = S * Dq;
      a.q_ss = Dq;
      a.q_sh = H;
      if (!k.present()) return error(err_prefix() + "query (B, S, N*H) needs key (and value unless key is packed KV)");
      if (k.rank() == 5) {  // packed KV (B, L, N, 2, H)
        if (v.present()) return error(err_prefix() + "packed KV key (B, L, N, 2, H) takes no value input");
        if (k.shape[0] != B || k.shape[2] != N || k.shape[3] != 2 || k.shape[4] != H)
          return error(err_prefix() + "packed KV key must be (B=" + std::to_string(B) + ", L, N=" + std::to_string(N) +
                       ", 2, H=" + std::to_string(H) + "), got " + shape_str(k.shape));
        const int64_t L = k.shape[1];
        a.Sk = L;
        a.Dv = H;
        a.k_sb = a.v_sb = L * N * 2 * H;
        a.k_ss = a.v_ss = N * 2 * H;
        a.k_sh = a.v_sh = 2 * H;
        a.k = k.data;
        a.v = static_cast<const char*>(k.data) + H * es;
      } else if (k.rank() == 3) {
        if (!v.present()) return error(err_prefix() + "key (B, L, N*H) needs a value input");
        if (v.rank() != 3)
          return error(err_prefix() + "value must be (B, L, N*Hv) like key, got " + shape_str(v.shape));
        const int64_t L = k.shape[1];
        if (k.shape[0] != B || k.shape[2] != Dq)
          return error(err_prefix() + "key must be (B=" + std::to_string(B) + ", L, " + std::to_string(Dq) +
                       "), got " + shape_str(k.shape));
        if (v.shape[0] != B || v.shape[1] != L || v.shape[2] % N != 0)
          return error(err_prefix() + "value must be (B=" + std::to_string(B) + ", L=" + std::to_string(L) +
                       ", N*Hv) with N=" + std::to_string(N) + ", got " + shape_str(v.shape));
        const int64_t Dv = v.shape[2], Hv = Dv / N;
        a.Sk = L;
        a.Dv = Hv;
        a.k = k.data;
        a.k_sb = L * Dq;
        a.k_ss = Dq;
        a.k_sh = H;
        a.v = v.data;
        a.v_sb = L * Dv;
        a.v_ss = Dv;
        a.v_sh = Hv;
      } else {
        return error(err_prefix() + "key must be (B, L, N*H) or packed KV (B, L, N, 2, H); got " +
                     shape_str(k.shape) + " (the BNSH key/value layout is not supported)");
      }
    } else {
      return error(err_prefix() + "query must be (B, S, N*H) or packed QKV (B, S, N, 3, H), got " +
                   shape_str(q.shape));
    }
    a.scale = scale_ != 0.0f ? scale_ : 1.0f / std::sqrt(static_cast<float>(a.D));
    a.causal = causal_;
    if (causal_ && a.Sq > a.Sk)
      return error(err_prefix() + "unidirectional attention needs query length " + std::to_string(a.Sq) +
                   " <= key length " + std::to_string(a.Sk));

    const std::vector<int64_t> oshape = {a.B, a.Sq, N * a.Dv};
    SDKERN_ORT_TRY(output(ctx, 0, oshape, &o));
    if (a.B == 0 || a.Sq == 0 || N == 0 || a.Dv == 0) return nullptr;
    if (a.Sk == 0) return error(err_prefix() + "key/value sequence length is 0");
    a.o = o.data;
    if (ep_ == Ep::kCpu) return from_status(sdkern::attention_cpu(a), kOp);
#ifdef SDKERN_ORT_WITH_CUDA
    cudaStream_t stream = nullptr;
    SDKERN_ORT_TRY(cuda_stream(ctx, &stream));
    return from_status(sdkern::attention_cuda(a, stream), kOp);
#else
    return error("sdkern.MultiHeadAttention: this library was built without CUDA", ORT_NOT_IMPLEMENTED);
#endif
  }

 private:
  int64_t heads_;
  float scale_;
  bool causal_;  // attribute unidirectional = 1
  Ep ep_;
};

OrtStatus* create(const OrtKernelInfo* info, Ep ep, std::unique_ptr<Kernel>* out) {
  const int64_t zero = 0;
  const float fzero = 0.0f, mask_def = -10000.0f;
  int64_t heads = 0, unidirectional = 0;
  float scale = 0.0f, mask_filter = 0.0f;
  SDKERN_ORT_TRY(attr_int(info, kOp, "num_heads", nullptr, &heads));
  SDKERN_ORT_TRY(attr_float(info, kOp, "scale", &fzero, &scale));
  SDKERN_ORT_TRY(attr_int(info, kOp, "unidirectional", &zero, &unidirectional));
  SDKERN_ORT_TRY(attr_float(info, kOp, "mask_filter_value", &mask_def, &mask_filter));
  if (heads <= 0) return error(err_prefix() + "attribute 'num_heads' must be positive, got " + std::to_string(heads));
  if (!std::isfinite(scale))
    return error(err_prefix() + "attribute 'scale' must be a finite number (0 = 1/sqrt(head size)), got " +
                 std::to_string(scale));
  if (unidirectional != 0 && unidirectional != 1)
    return error(err_prefix() + "attribute 'unidirectional' must be 0 or 1, got " + std::to_string(unidirectional));
  // Optional outputs present_key / present_value / qk are not produced: refuse such nodes up front.
  size_t n_out = 0;
  SDKERN_ORT_TRY(api().KernelInfo_GetOutputCount(info, &n_out));
  for (size_t i = 1; i < n_out && i < 4; ++i) {
    size_t len = 0;
    SDKERN_ORT_TRY(api().KernelInfo_GetOutputName(info, i, nullptr, &len));
    if (len > 1)  // a non-empty name: the output is used
      return error(err_prefix() + "optional output '" + kOutputNames[i] + "' is not supported", ORT_NOT_IMPLEMENTED);
  }
  out->reset(new MhaKernel(heads, scale, unidirectional == 1, ep));
  return nullptr;
}

}  // namespace

void register_multi_head_attention(OpList& ops) {
  std::vector<IoSpec> inputs = {{IoType::kT, false}, {IoType::kT, true}, {IoType::kT, true}};
  for (int i = 3; i < 10; ++i) inputs.push_back({IoType::kAny, true});
  add_op(ops, kOp, inputs, {{IoType::kT, false}, {IoType::kT, true}, {IoType::kT, true}, {IoType::kT, true}}, create);
}

}  // namespace sdkern_ort
