# CPU kernels: every kernel source below is compiled once per ISA level (baseline, avx2, avx512,
# avx512bf16 on x86-64) into namespace sdkern::cpu::<level>; kernels/cpu/dispatch.cpp (compiled once)
# chooses at run time. Release builds are portable (no -march=native unless SDKERN_NATIVE=ON).
# A new op adds its kernels/cpu/<op>.cpp to SDKERN_CPU_KERNELS and its kernels/common/check_<op>.cpp
# to SDKERN_COMMON_SOURCES (one line each, kept sorted).
set(SDKERN_CPU_KERNELS
    kernels/cpu/attention.cpp
    kernels/cpu/bias_add.cpp
    kernels/cpu/bias_split_gelu.cpp
    kernels/cpu/group_norm.cpp
    kernels/cpu/skip_group_norm.cpp
    kernels/cpu/skip_layer_norm.cpp
    kernels/cpu/winograd_input.cpp
    kernels/cpu/winograd_output.cpp
)
list(TRANSFORM SDKERN_CPU_KERNELS PREPEND "${CMAKE_CURRENT_SOURCE_DIR}/")
# Argument validation shared by every backend (framework-free, compiled once).
set(SDKERN_COMMON_SOURCES
    kernels/common/check_attention.cpp
    kernels/common/check_bias_add.cpp
    kernels/common/check_bias_split_gelu.cpp
    kernels/common/check_group_norm.cpp
    kernels/common/check_skip_layer_norm.cpp
    kernels/common/check_winograd_input.cpp
    kernels/common/check_winograd_output.cpp
)
list(TRANSFORM SDKERN_COMMON_SOURCES PREPEND "${CMAKE_CURRENT_SOURCE_DIR}/")

set(SDKERN_CPU_FLAGS_COMMON -O3 -fno-math-errno -fno-trapping-math)
if(MSVC)
  set(SDKERN_CPU_FLAGS_COMMON /O2)
endif()

set(SDKERN_CPU_ISAS baseline)
set(SDKERN_ISA_FLAGS_baseline "")
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64" AND NOT MSVC)
  if(SDKERN_NATIVE)
    set(SDKERN_ISA_FLAGS_baseline -march=native)
  else()
    list(APPEND SDKERN_CPU_ISAS avx2 avx512 avx512bf16)
    set(SDKERN_ISA_FLAGS_avx2 -mavx2 -mfma -mf16c)
    set(SDKERN_ISA_FLAGS_avx512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c)
    set(SDKERN_ISA_FLAGS_avx512bf16 ${SDKERN_ISA_FLAGS_avx512} -mavx512bf16)
  endif()
endif()

set(SDKERN_ISA_OBJECTS "")
foreach(isa IN LISTS SDKERN_CPU_ISAS)
  add_library(sdkern_cpu_${isa} OBJECT ${SDKERN_CPU_KERNELS})
  target_include_directories(sdkern_cpu_${isa} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/kernels/include")
  target_compile_definitions(sdkern_cpu_${isa} PRIVATE SDKERN_ISA_NS=${isa})
  target_compile_options(sdkern_cpu_${isa} PRIVATE ${SDKERN_CPU_FLAGS_COMMON} ${SDKERN_ISA_FLAGS_${isa}})
  if(OpenMP_CXX_FOUND)
    target_link_libraries(sdkern_cpu_${isa} PRIVATE OpenMP::OpenMP_CXX)
  endif()
  list(APPEND SDKERN_ISA_OBJECTS $<TARGET_OBJECTS:sdkern_cpu_${isa}>)
endforeach()

add_library(sdkern_core STATIC "${CMAKE_CURRENT_SOURCE_DIR}/kernels/cpu/dispatch.cpp"
                               "${CMAKE_CURRENT_SOURCE_DIR}/kernels/cpu/host_pool.cpp" ${SDKERN_COMMON_SOURCES}
                               ${SDKERN_ISA_OBJECTS})
target_include_directories(sdkern_core PUBLIC "${CMAKE_CURRENT_SOURCE_DIR}/kernels/include")
target_compile_options(sdkern_core PRIVATE ${SDKERN_CPU_FLAGS_COMMON})
foreach(isa IN LISTS SDKERN_CPU_ISAS)
  string(TOUPPER ${isa} ISA_UPPER)
  target_compile_definitions(sdkern_core PRIVATE SDKERN_HAVE_${ISA_UPPER}=1)
endforeach()
if(OpenMP_CXX_FOUND)
  target_link_libraries(sdkern_core PUBLIC OpenMP::OpenMP_CXX)
else()
  message(WARNING "sdkern: OpenMP not found; CPU kernels run single-threaded")
endif()
