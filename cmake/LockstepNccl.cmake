# The NCCL backend (docs/gpu.md). Two parts, so that as much of it as possible is built wherever CUDA
# and NCCL are installed, even against a CPU-only LibTorch:
#   src/comm/nccl/*.cpp            CUDA runtime + NCCL + MPI only (nccl::Core: the communicator, its
#                                  stream, events, watchdog, dtype mapping). Built and linked whenever
#                                  CUDA and NCCL are found.
#   src/comm/nccl/torch_cuda/*.cpp the Communicator over CUDA tensors; needs a CUDA-enabled LibTorch
#                                  (current stream, caching allocator). Linked when LibTorch has CUDA;
#                                  otherwise only compiled (syntax-checked) when its headers are there
#                                  (LOCKSTEP_CHECK_TORCH_CUDA_SOURCES), and src/comm/fallback/ stands in.
set(LOCKSTEP_HAVE_NCCL OFF)
set(LOCKSTEP_TORCH_HAS_CUDA OFF)
if(LOCKSTEP_WITH_NCCL)
  find_package(CUDAToolkit QUIET)
  find_package(NCCL QUIET)
  if(TARGET torch_cuda OR TARGET c10_cuda OR TORCH_CUDA_LIBRARIES)
    set(LOCKSTEP_TORCH_HAS_CUDA ON)
  endif()
  if(CUDAToolkit_FOUND AND NCCL_FOUND)
    set(LOCKSTEP_HAVE_NCCL ON)
  endif()
endif()
message(STATUS "Lockstep: CUDA toolkit ${CUDAToolkit_VERSION} found=${CUDAToolkit_FOUND}, NCCL ${NCCL_VERSION} found=${NCCL_FOUND}, LibTorch with CUDA=${LOCKSTEP_TORCH_HAS_CUDA}")

file(GLOB LOCKSTEP_NCCL_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/src/comm/nccl/*.cpp")
file(GLOB LOCKSTEP_NCCL_TORCH_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/src/comm/nccl/torch_cuda/*.cpp")
set(LOCKSTEP_NCCL_FALLBACK_SOURCES "${PROJECT_SOURCE_DIR}/src/comm/fallback/nccl_unavailable.cpp")

# Are LibTorch's CUDA headers (c10/cuda, ATen/cuda) installed? Debian's CPU libtorch-dev ships them
# without libc10_cuda, which is enough to compile (never link) the torch_cuda part.
set(_lockstep_torch_cuda_headers OFF)
foreach(dir IN LISTS TORCH_INCLUDE_DIRS)
  if(EXISTS "${dir}/c10/cuda/CUDAStream.h")
    set(_lockstep_torch_cuda_headers ON)
  endif()
endforeach()
set(_lockstep_check_default OFF)
if(LOCKSTEP_HAVE_NCCL AND NOT LOCKSTEP_TORCH_HAS_CUDA AND _lockstep_torch_cuda_headers)
  set(_lockstep_check_default ON)
endif()
option(LOCKSTEP_CHECK_TORCH_CUDA_SOURCES
       "Compile (never link) the parts that need a CUDA LibTorch, against its headers, when LibTorch has no CUDA"
       ${_lockstep_check_default})

set(LOCKSTEP_NCCL_STATUS "not built")
if(LOCKSTEP_HAVE_NCCL AND LOCKSTEP_NCCL_SOURCES)
  target_sources(lockstep PRIVATE ${LOCKSTEP_NCCL_SOURCES})
  target_link_libraries(lockstep PRIVATE CUDA::cudart NCCL::NCCL)
  target_compile_definitions(lockstep PRIVATE LOCKSTEP_HAVE_NCCL=1)
  if(LOCKSTEP_TORCH_HAS_CUDA)
    target_sources(lockstep PRIVATE ${LOCKSTEP_NCCL_TORCH_SOURCES})
    target_compile_definitions(lockstep PRIVATE LOCKSTEP_TORCH_HAS_CUDA=1)
    set(LOCKSTEP_NCCL_STATUS "built: CUDA/NCCL part and the LibTorch CUDA part (NCCL ${NCCL_VERSION}, CUDA ${CUDAToolkit_VERSION})")
  else()
    target_sources(lockstep PRIVATE ${LOCKSTEP_NCCL_FALLBACK_SOURCES})
    set(LOCKSTEP_NCCL_UNAVAILABLE_REASON "LibTorch ${Torch_VERSION} was built without CUDA (the CUDA/NCCL-only part, NCCL ${NCCL_VERSION} and CUDA ${CUDAToolkit_VERSION}, is built; the communicator needs a CUDA LibTorch)")
    set(LOCKSTEP_NCCL_STATUS "built: CUDA/NCCL-only part (NCCL ${NCCL_VERSION}, CUDA ${CUDAToolkit_VERSION}); the LibTorch CUDA part is not (LibTorch has no CUDA)")
  endif()
else()
  target_sources(lockstep PRIVATE ${LOCKSTEP_NCCL_FALLBACK_SOURCES})
  set(LOCKSTEP_NCCL_UNAVAILABLE_REASON "CUDA (found: ${CUDAToolkit_FOUND}) and NCCL (found: ${NCCL_FOUND}) were not both found when Lockstep was configured (LOCKSTEP_WITH_NCCL=${LOCKSTEP_WITH_NCCL})")
endif()
# The fallback's explanation, as a generated header (a define with spaces and quotes on the command
# line does not survive precompiled headers and ccache).
file(CONFIGURE OUTPUT ${PROJECT_BINARY_DIR}/generated/comm/nccl_build_info.hpp
     CONTENT "#pragma once\n#define LOCKSTEP_NCCL_UNAVAILABLE_REASON \"@LOCKSTEP_NCCL_UNAVAILABLE_REASON@\"\n" @ONLY)
target_include_directories(lockstep PRIVATE ${PROJECT_BINARY_DIR}/generated)
message(STATUS "Lockstep: NCCL backend: ${LOCKSTEP_NCCL_STATUS}")

# Compile-only check of the LibTorch-CUDA sources (lockstep_torch_cuda_check, part of `all`): catches
# breakage of code this machine cannot link. C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU package lacks
# the generated c10/cuda/impl/cuda_cmake_macros.h (it only defines export macros).
if(LOCKSTEP_CHECK_TORCH_CUDA_SOURCES AND LOCKSTEP_HAVE_NCCL AND NOT LOCKSTEP_TORCH_HAS_CUDA)
  add_library(lockstep_torch_cuda_check OBJECT ${LOCKSTEP_NCCL_TORCH_SOURCES})
  target_link_libraries(lockstep_torch_cuda_check PRIVATE lockstep CUDA::cudart NCCL::NCCL)
  target_include_directories(lockstep_torch_cuda_check PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_compile_definitions(lockstep_torch_cuda_check PRIVATE C10_CUDA_NO_CMAKE_CONFIGURE_FILE LOCKSTEP_HAVE_NCCL=1
                                                               LOCKSTEP_TORCH_HAS_CUDA=1)
  target_compile_options(lockstep_torch_cuda_check PRIVATE -Wall -Wextra -Wno-unused-parameter)
  message(STATUS "Lockstep: LibTorch-CUDA sources: compile-only check (lockstep_torch_cuda_check)")
endif()
