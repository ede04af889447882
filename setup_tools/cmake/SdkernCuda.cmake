# CUDA kernels (kernels/cuda/*.cu) and the sdkern._C_cuda module. SDKERN_CUDA=AUTO builds them when
# nvcc is found; ON makes a missing toolkit an error; OFF skips. SDKERN_CUDA_ARCHS picks the SMs.
set(SDKERN_CUDA_BUILT OFF)
if(SDKERN_CUDA STREQUAL "OFF")
  message(STATUS "sdkern: CUDA kernels: skipped (SDKERN_CUDA=OFF)")
  return()
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(SDKERN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "sdkern: SDKERN_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
  message(STATUS "sdkern: CUDA kernels: skipped (no nvcc found)")
  return()
endif()

# One .cu per op (attention: the SIMT kernel plus one tensor-core instantiation per dtype).
set(SDKERN_CUDA_SOURCES
    kernels/cuda/attention.cu
    kernels/cuda/attention_tc_bf16.cu
    kernels/cuda/attention_tc_f16.cu
    kernels/cuda/bias_add.cu
    kernels/cuda/bias_split_gelu.cu
    kernels/cuda/group_norm.cu
    kernels/cuda/skip_group_norm.cu
    kernels/cuda/skip_layer_norm.cu
)
list(TRANSFORM SDKERN_CUDA_SOURCES PREPEND "${CMAKE_CURRENT_SOURCE_DIR}/")

if(NOT SDKERN_CUDA_ARCHS)
  # Default: the architectures of the GPUs this machine sees (one short compile), else 80;90 (A100, H100).
  set(SDKERN_CUDA_ARCHS "80;90")
  find_program(SDKERN_NVIDIA_SMI nvidia-smi)
  if(SDKERN_NVIDIA_SMI)
    execute_process(COMMAND "${SDKERN_NVIDIA_SMI}" --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE _caps RESULT_VARIABLE _smi_rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_smi_rc EQUAL 0 AND _caps MATCHES "^[0-9]")
      string(REPLACE "." "" _caps "${_caps}")
      string(REGEX REPLACE "[ \t\r\n]+" ";" _caps "${_caps}")
      list(REMOVE_DUPLICATES _caps)
      set(SDKERN_CUDA_ARCHS "${_caps}")
      message(STATUS "sdkern: SDKERN_CUDA_ARCHS not set: the visible GPUs' ${SDKERN_CUDA_ARCHS}")
    endif()
  endif()
endif()
set(CMAKE_CUDA_ARCHITECTURES "${SDKERN_CUDA_ARCHS}")
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
find_package(CUDAToolkit REQUIRED)

add_library(sdkern_cuda STATIC ${SDKERN_CUDA_SOURCES})
target_include_directories(sdkern_cuda PUBLIC "${CMAKE_CURRENT_SOURCE_DIR}/kernels/include")
target_compile_options(sdkern_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v --expt-relaxed-constexpr -lineinfo>)
target_link_libraries(sdkern_cuda PUBLIC CUDA::cudart_static)
set_target_properties(sdkern_cuda PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)

string(REPLACE ";" "," SDKERN_CUDA_ARCHS_CSV "${SDKERN_CUDA_ARCHS}")
pybind11_add_module(_C_cuda MODULE ${SDKERN_BIND_SOURCES})
target_compile_definitions(_C_cuda PRIVATE SDKERN_BIND_CUDA=1 SDKERN_MODULE_NAME=_C_cuda
                                           SDKERN_CUDA_ARCHS_STR="${SDKERN_CUDA_ARCHS_CSV}")
target_link_libraries(_C_cuda PRIVATE sdkern_cuda sdkern_core)
install(TARGETS _C_cuda LIBRARY DESTINATION ${SDKERN_INSTALL_DIR})
set(SDKERN_CUDA_BUILT ON)
message(STATUS "sdkern: CUDA kernels: built for SM ${SDKERN_CUDA_ARCHS} (nvcc ${CMAKE_CUDA_COMPILER_VERSION})")
