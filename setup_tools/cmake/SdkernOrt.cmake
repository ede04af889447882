# ONNX Runtime custom-op library libsdkern_ort. It compiles against the ONNX Runtime C API headers only
# (the library is loaded by onnxruntime at run time, nothing is linked). The headers come from:
#   1. SDKERN_ORT_INCLUDE_DIR (cache variable or environment) when set: a directory holding
#      onnxruntime_c_api.h, e.g. to build against another ORT release;
#   2. otherwise the copy vendored in this repository, third_party/onnxruntime-1.21 (ORT 1.21.0's public
#      API headers, MIT; see third_party/onnxruntime-1.21/README.md).
# Nothing is downloaded: a build needs only the repository and PyPI.
set(SDKERN_ORT_BUILT OFF)
set(SDKERN_ORT_VENDORED_INCLUDE "${CMAKE_CURRENT_SOURCE_DIR}/third_party/onnxruntime-1.21/include/onnxruntime")
set(_ort_inc "")
if(SDKERN_ORT_INCLUDE_DIR)
  get_filename_component(_ort_dir "${SDKERN_ORT_INCLUDE_DIR}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
  if(EXISTS "${_ort_dir}/onnxruntime_c_api.h")
    set(_ort_inc "${_ort_dir}")
  else()
    message(FATAL_ERROR "sdkern: SDKERN_ORT_INCLUDE_DIR=${SDKERN_ORT_INCLUDE_DIR} has no onnxruntime_c_api.h "
                        "(unset it to use the vendored headers in third_party/onnxruntime-1.21)")
  endif()
elseif(EXISTS "${SDKERN_ORT_VENDORED_INCLUDE}/onnxruntime_c_api.h")
  set(_ort_inc "${SDKERN_ORT_VENDORED_INCLUDE}")
endif()

if(NOT _ort_inc)
  message(STATUS "sdkern: ORT library: skipped (no ONNX Runtime headers: ${SDKERN_ORT_VENDORED_INCLUDE} is "
                 "missing and SDKERN_ORT_INCLUDE_DIR is not set)")
  return()
endif()

# One adapter per op plus the shared glue and the registration.
set(SDKERN_ORT_SOURCES
    csrc/ort/bias_add.cpp
    csrc/ort/bias_split_gelu.cpp
    csrc/ort/group_norm.cpp
    csrc/ort/multi_head_attention.cpp
    csrc/ort/ort_common.cpp
    csrc/ort/register.cpp
    csrc/ort/skip_group_norm.cpp
    csrc/ort/skip_layer_norm.cpp
)
list(TRANSFORM SDKERN_ORT_SOURCES PREPEND "${CMAKE_CURRENT_SOURCE_DIR}/")
add_library(sdkern_ort SHARED ${SDKERN_ORT_SOURCES})
target_include_directories(sdkern_ort PRIVATE "${_ort_inc}" "${CMAKE_CURRENT_SOURCE_DIR}/kernels/include")
target_link_libraries(sdkern_ort PRIVATE sdkern_core)
if(SDKERN_CUDA_BUILT)
  target_link_libraries(sdkern_ort PRIVATE sdkern_cuda)
  target_compile_definitions(sdkern_ort PRIVATE SDKERN_ORT_WITH_CUDA=1)
endif()
set_target_properties(sdkern_ort PROPERTIES CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
if(UNIX AND NOT APPLE)
  # Export RegisterCustomOps and nothing else.
  target_link_options(sdkern_ort PRIVATE "-Wl,--version-script=${CMAKE_CURRENT_SOURCE_DIR}/csrc/ort/exports.map")
endif()
install(TARGETS sdkern_ort LIBRARY DESTINATION ${SDKERN_INSTALL_DIR} RUNTIME DESTINATION ${SDKERN_INSTALL_DIR})
set(SDKERN_ORT_BUILT ON)
message(STATUS "sdkern: ORT library: built (headers ${_ort_inc})")
