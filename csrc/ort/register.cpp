// libsdkern_ort: entry point ONNX Runtime calls when the library is registered
// (SessionOptions.register_custom_ops_library). Requests C API version 21 so the library loads in
// every onnxruntime >= 1.21. The sdkern-domain ops are added to the domain here.
#include "onnxruntime_c_api.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(21);
  if (api == nullptr) return nullptr;  // cannot even report: runtime older than 1.21
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain("sdkern", &domain)) return st;
  return api->AddCustomOpDomain(options, domain);
}
