// libsdkern_ort: entry point ONNX Runtime calls when the library is registered
// (SessionOptions.register_custom_ops_library). Requests C API version 21 so the library loads in
// every onnxruntime >= 1.21.
//
// Lifetime: ORT keeps raw pointers to the custom-op domain (until sessions are created) and to the
// OrtCustomOp objects (for as long as sessions live). Both are therefore owned by this library: the
// op objects and ONE domain are created on the first registration and reused by every later one, so
// registering the library on any number of SessionOptions allocates nothing more. They are released
// by static destructors when the library is unloaded (ORT keeps the library loaded while a session
// or SessionOptions that registered it is alive).
#include <exception>
#include <memory>
#include <mutex>
#include <string>

#include "onnxruntime_c_api.h"
#include "ort_common.h"

namespace sdkern_ort {
namespace {

struct Registry {
  std::mutex mu;
  OpList ops;
  OrtCustomOpDomain* domain = nullptr;
  const OrtApi* domain_api = nullptr;  // the API table that created `domain`

  ~Registry() {
    if (domain != nullptr && domain_api != nullptr) domain_api->ReleaseCustomOpDomain(domain);
  }

  // Creates the op objects and the domain once; returns the shared domain.
  OrtStatus* get(const OrtApi* a, OrtCustomOpDomain** out) {
    std::lock_guard<std::mutex> lock(mu);
    if (domain == nullptr) {
      if (ops.empty()) {
        register_group_norm(ops);
        register_skip_group_norm(ops);
        register_bias_split_gelu(ops);
        register_bias_add(ops);
        register_skip_layer_norm(ops);
        register_multi_head_attention(ops);
      }
      OrtCustomOpDomain* d = nullptr;
      if (OrtStatus* st = a->CreateCustomOpDomain("sdkern", &d)) return st;
      for (const auto& op : ops) {
        if (OrtStatus* st = a->CustomOpDomain_Add(d, op.get())) {
          a->ReleaseCustomOpDomain(d);
          return st;
        }
      }
      domain = d;
      domain_api = a;
    }
    *out = domain;
    return nullptr;
  }
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace
}  // namespace sdkern_ort

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(21);
  if (api == nullptr) {  // runtime older than 1.21: report through the oldest table
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, "sdkern: libsdkern_ort needs onnxruntime >= 1.21 (C API 21)") : nullptr;
  }
  sdkern_ort::set_api(api);
  try {
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = sdkern_ort::registry().get(api, &domain)) return st;
    return api->AddCustomOpDomain(options, domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("sdkern: registering the custom ops failed: ") + e.what()).c_str());
  }
}
