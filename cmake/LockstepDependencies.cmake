# Finds what Lockstep builds on; every dependency comes from Debian 12 (scripts/install-deps.sh).
include(GNUInstallDirs)
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_package(Threads REQUIRED)
find_package(Torch REQUIRED)
find_package(MPI REQUIRED COMPONENTS CXX)
find_package(yaml-cpp REQUIRED)
find_package(ZLIB REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
message(STATUS "Lockstep: LibTorch ${Torch_VERSION} (${TORCH_INSTALL_PREFIX}), MPI ${MPI_CXX_VERSION} (${MPI_CXX_LIBRARIES})")

# Debian's yaml-cpp exports a target without a namespace; newer releases export yaml-cpp::yaml-cpp.
if(NOT TARGET yaml-cpp AND TARGET yaml-cpp::yaml-cpp)
  add_library(yaml-cpp ALIAS yaml-cpp::yaml-cpp)
endif()
