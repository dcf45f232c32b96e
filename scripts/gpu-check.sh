#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and PyTorch installed (nothing fetched from the
# network), builds Lockstep against the LibTorch inside that PyTorch, runs the tests labelled gpu
# and the GPU benchmarks, and prints one summary.
#
#   ./scripts/gpu-check.sh                 # PYTHON=python3, build dir build-gpu
#   LOCKSTEP_DEBS=third_party/debs ./scripts/gpu-check.sh   # no MPI there: unpack carried .debs
#   LOCKSTEP_GPU_CHECK_ALL=1 ./scripts/gpu-check.sh         # also build and run every other test
#   LOCKSTEP_GPU_CHECK_BENCH=0 ./scripts/gpu-check.sh       # the tests only, no benchmarks
#
# Limits, for a lent machine whose time is short (a hang must fail a test, not use up the lease):
#   LOCKSTEP_GPU_TESTS_TIMEOUT_S  the whole gpu test run (default 900)
#   LOCKSTEP_GPU_TEST_TIMEOUT_S   each CTest entry (default 600; CTest kills the entry's process tree)
#   LOCKSTEP_GPU_COMM_TIMEOUT_S   a collective inside the tests (LOCKSTEP_TIMEOUT_S there; default 120),
#                                 and, when set, inside the benchmarks too (exported as LOCKSTEP_TIMEOUT_S;
#                                 unset, the benchmarks keep LOCKSTEP_TIMEOUT_S or the library's 600 s)
#   LOCKSTEP_GPU_BENCH_TIMEOUT_S  each benchmark command (default: 180 for the NCCL all-reduce sweep, 240
#                                 for each ResNet-18 run); one that runs out is killed and shows as a FAIL
#                                 line, and after a timed-out NCHW run that program's channels_last run is skipped
#   LOCKSTEP_GPU_CHECK_NHWC=0     skip the channels_last ResNet runs (reported, not judged)
#
# By default it builds only what the GPU check runs (the library, the gpu tests, the NCCL core's unit
# tests, the two GPU benchmarks): on a lent GPU machine the device time is short, and the other tests
# run in CI.
#
# What it needs there: nvidia driver + GPU, python3 with torch (CUDA build), g++, cmake >= 3.18, and
# CUDA's NCCL (PyTorch's wheels carry libnccl; the headers come from a CUDA toolkit or the
# nvidia-nccl-cu* wheel). MPI, yaml-cpp, nlohmann-json, CLI11 and Catch2 come from the system or from
# the .debs scripts/fetch-mpi-debs.sh prepared (unpacked with dpkg-deb -x into build-gpu/prefix).
# Acceptance (docs/gpu.md): gpu tests pass; NCCL busbw >= 95% of raw ncclAllReduce from 16 MB;
# Lockstep's ResNet-18 images/s >= PyTorch's.
set -uo pipefail
# Paths given in the environment are the caller's, relative to the directory it ran this from.
abspath() { if [[ -z $1 || $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi; }
[[ -n ${LOCKSTEP_GPU_BUILD_DIR:-} ]] && LOCKSTEP_GPU_BUILD_DIR=$(abspath "$LOCKSTEP_GPU_BUILD_DIR")
[[ -n ${LOCKSTEP_DEBS:-} ]] && LOCKSTEP_DEBS=$(abspath "$LOCKSTEP_DEBS")
[[ -n ${YAML_CPP_PREFIX:-} ]] && YAML_CPP_PREFIX=$(abspath "$YAML_CPP_PREFIX")
cd "$(dirname "$0")/.." || exit 1
root=$PWD
started=$SECONDS
elapsed() { echo "$((SECONDS - started)) s"; }
PYTHON=${PYTHON:-python3}
build=${LOCKSTEP_GPU_BUILD_DIR:-build-gpu}
log() { echo "gpu-check: $*"; }
if [[ -n ${LOCKSTEP_GPU_BENCH_TIMEOUT_S:-} && ! $LOCKSTEP_GPU_BENCH_TIMEOUT_S =~ ^[1-9][0-9]*$ ]]; then
  log "LOCKSTEP_GPU_BENCH_TIMEOUT_S must be a whole number of seconds >= 1, found '$LOCKSTEP_GPU_BENCH_TIMEOUT_S'"
  exit 1
fi
mkdir -p "$build"
summary=()
status=0
note() { summary+=("$1"); }

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  log "PyTorch with a usable GPU not found ($PYTHON); nothing to check"
  exit 77
fi
# LibTorch's CMake config enables the CUDA language: it needs nvcc, from the toolkit matching PyTorch's CUDA.
if ! command -v nvcc > /dev/null && [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
  export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
fi
command -v nvcc > /dev/null || { log "no nvcc on PATH or in ${CUDA_HOME:-/usr/local/cuda}/bin: LibTorch's CMake config needs a CUDA toolkit"; exit 1; }
torch_prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
torch_abi=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
torch_version=$("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
nhwc=${LOCKSTEP_GPU_CHECK_NHWC:-1}
log "PyTorch $torch_version, CMake prefix $torch_prefix, _GLIBCXX_USE_CXX11_ABI=$torch_abi"
if [[ $torch_abi == 0 ]]; then
  # Everything Lockstep links must agree on the ABI flag. Header-only Catch2 and nlohmann-json and
  # MPI's C interface do not care; Debian's yaml-cpp (std::string in its interface) is built with
  # ABI 1 and will not link: put a yaml-cpp built with -D_GLIBCXX_USE_CXX11_ABI=0 on YAML_CPP_PREFIX.
  log "warning: this PyTorch uses the old C++ ABI (_GLIBCXX_USE_CXX11_ABI=0); a yaml-cpp built the same way is needed${YAML_CPP_PREFIX:+ (using $YAML_CPP_PREFIX)}"
fi

# ---- MPI and the small build dependencies: the system's, else carried .debs.
prefix=$build/prefix; [[ $prefix == /* ]] || prefix=$root/$prefix
cmake_extra=()
# What the system lacks of them (an image may have MPI, or HPC-X, but not the small header libraries).
missing=()
command -v mpirun > /dev/null || missing+=(mpirun)
has_header() { for dir in /usr/include /usr/local/include ${CPATH:+${CPATH//:/ }}; do [[ -f $dir/$1 ]] && return 0; done; return 1; }
has_header yaml-cpp/yaml.h || [[ -n ${YAML_CPP_PREFIX:-} ]] || missing+=(yaml-cpp)
has_header nlohmann/json.hpp || missing+=(nlohmann-json)
has_header CLI/CLI.hpp || missing+=(CLI11)
has_header catch2/catch.hpp || missing+=(Catch2)
if [[ ${#missing[@]} -gt 0 || -n ${LOCKSTEP_DEBS:-} ]]; then
  debs=${LOCKSTEP_DEBS:-third_party/debs}
  [[ ${#missing[@]} -gt 0 ]] && log "the system lacks: ${missing[*]}"
  if compgen -G "$debs/*.deb" > /dev/null; then
    command -v dpkg-deb > /dev/null || { log "dpkg-deb is needed to unpack the .debs in $debs (Debian's dpkg package)"; exit 1; }
    # Debian 12's binaries need its glibc (2.36) or newer: an older host fails late, at the first mpirun.
    glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
    if [[ $(printf '%s\n' 2.36 "$glibc" | sort -V | head -1) != 2.36 ]]; then
      log "this host's glibc $glibc is older than Debian 12's 2.36: the carried .debs cannot run here; install MPI, yaml-cpp, nlohmann-json, CLI11 and Catch2 2.x instead"
      exit 1
    fi
    log "unpacking $(ls "$debs"/*.deb | wc -l) .debs from $debs into $prefix"
    mkdir -p "$prefix"
    for deb in "$debs"/*.deb; do
      dpkg-deb -x "$deb" "$prefix" || { log "cannot unpack $deb"; exit 1; }
    done
    # Symbolic links with absolute targets (libz.so -> /lib/x86_64-linux-gnu/libz.so.1.2.13) point out
    # of the prefix, at the host's files or at nothing: point them at the unpacked files. And no static
    # archives that have a shared twin: find_package would take Debian's non-PIC libz.a when libz.so dangles (seen on an H200
    # machine: "relocation R_X86_64_PC32 against symbol z_errmsg", liblockstep.so did not link).
    while IFS= read -r -d '' link; do
      target=$(readlink "$link")
      [[ $target == /* && -e $prefix$target ]] && ln -sfn "$prefix$target" "$link"
    done < <(find "$prefix" -type l -print0)
    while IFS= read -r -d '' archive; do
      [[ -e ${archive%.a}.so ]] && rm -f "$archive"    # keep archives with no shared twin (Catch2's)
    done < <(find "$prefix" -name 'lib*.a' -print0)
    # dpkg-deb -x runs no maintainer scripts, so the alternatives that name the launcher and compiler
    # wrappers (mpirun -> mpirun.openmpi, ...) do not exist: make them.
    for tool in mpirun mpiexec mpicc mpicxx mpic++; do
      [[ -e $prefix/usr/bin/$tool.openmpi ]] && ln -sfn "$tool.openmpi" "$prefix/usr/bin/$tool"
    done
    # The .debs' own architecture names their library directory (the host's gcc may not say: only
    # Debian's prints a multiarch triplet).
    arch=
    for deb in "$debs"/*.deb; do
      arch=$(dpkg-deb -f "$deb" Architecture)
      [[ $arch != all ]] && break
    done
    case $arch in
      arm64) multiarch=aarch64-linux-gnu ;;
      *) multiarch=x86_64-linux-gnu ;;
    esac
    # The carried OpenMPI replaces the host's only where the host has none, or LOCKSTEP_DEBS asks for
    # the carried set: an image with its own MPI (HPC-X) keeps it, and takes only the libraries it lacks.
    carried_mpi=0
    [[ -n ${LOCKSTEP_DEBS:-} || " ${missing[*]} " == *" mpirun "* ]] && carried_mpi=1
    ompi=$prefix/usr/lib/$multiarch/openmpi
    # Only the carried libraries the host lacks go on the library path (plus OpenMPI's own, always):
    # the whole unpacked directory would shadow the host's libssl, libzstd, ... with Debian 12's.
    libs=$prefix/ld-library-path
    mkdir -p "$libs"
    host_libs=$(ldconfig -p | awk 'NR > 1 {print $1}')
    for lib in "$prefix/usr/lib/$multiarch"/*.so.*; do
      name=$(basename "$lib")
      if [[ $name =~ ^libyaml-cpp || ( $carried_mpi == 1 && $name =~ ^lib(mpi|open-pal|open-rte|pmix|hwloc|event) ) ]] ||
         ! grep -qxF "$name" <<< "$host_libs"; then
        ln -sfn "$lib" "$libs/$name"
      fi
    done
    if [[ $carried_mpi == 1 ]]; then
      export OPAL_PREFIX=$prefix/usr                   # relocated OpenMPI finds its plug-ins and help files
      # PMIx (a library of its own in Debian 12) is not relocated by OPAL_PREFIX: without its plug-in path
      # it still runs but prints "couldn't open the help file .../help-pcompress.txt" at every mpirun.
      export PMIX_MCA_mca_base_component_path=$prefix/usr/lib/$multiarch/pmix2/lib/pmix
      export PATH=$prefix/usr/bin:$PATH
      export LD_LIBRARY_PATH=$ompi/lib:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      cmake_extra+=(-DMPI_CXX_COMPILER="$prefix/usr/bin/mpicxx" -DMPIEXEC_EXECUTABLE="$prefix/usr/bin/mpirun")
    else
      log "keeping the host's MPI ($(command -v mpirun)); the .debs supply: ${missing[*]}"
      export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      # Named, or FindMPI could take the carried wrapper from the prefix below.
      cmake_extra+=(-DMPIEXEC_EXECUTABLE="$(command -v mpirun)")
      command -v mpicxx > /dev/null && cmake_extra+=(-DMPI_CXX_COMPILER="$(command -v mpicxx)")
    fi
    cmake_extra+=(-DCMAKE_PREFIX_PATH="$torch_prefix;$prefix/usr")
  else
    log "no .debs in $debs for what the system lacks (${missing[*]:-nothing; LOCKSTEP_DEBS is set}): see scripts/fetch-mpi-debs.sh"
    exit 1
  fi
fi
[[ ${#cmake_extra[@]} -eq 0 ]] && cmake_extra+=(-DCMAKE_PREFIX_PATH="$torch_prefix")
[[ -n ${YAML_CPP_PREFIX:-} ]] && cmake_extra+=(-Dyaml-cpp_DIR="$(dirname "$(find "$YAML_CPP_PREFIX" -name yaml-cpp-config.cmake | head -1)")")

# NCCL: the one PyTorch loads. Its pip wheel (nvidia-nccl-cu*) carries headers and library; a CUDA
# toolkit's NCCL is used otherwise (FindNCCL looks in /usr/local/cuda).
if [[ -z ${NCCL_ROOT:-} ]]; then
  wheel_nccl=$("$PYTHON" -c 'import os, nvidia.nccl as n; print(os.path.dirname(n.__file__) if n.__file__ else list(n.__path__)[0])' 2>/dev/null || true)
  [[ -n $wheel_nccl && -f $wheel_nccl/include/nccl.h ]] && export NCCL_ROOT=$wheel_nccl && log "NCCL from PyTorch's wheel: $NCCL_ROOT"
fi

# ---- Configure and build against PyTorch's LibTorch (its ABI flag, its CUDA, its NCCL).
launcher=()
command -v ccache > /dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
generator=()
[[ ! -f $build/CMakeCache.txt ]] && command -v ninja > /dev/null && generator=(-G Ninja)
if ! cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" "${cmake_extra[@]}" \
      -DCMAKE_CXX_FLAGS="-D_GLIBCXX_USE_CXX11_ABI=$torch_abi" -DLOCKSTEP_BUILD_EXAMPLES=ON \
      -DLOCKSTEP_GPU_TEST_TIMEOUT="${LOCKSTEP_GPU_TEST_TIMEOUT_S:-600}" \
      -DLOCKSTEP_GPU_COMM_TIMEOUT="${LOCKSTEP_GPU_COMM_TIMEOUT_S:-120}" \
      2>&1 | tee "$build/configure.log"; then
  log "configure failed"; exit 1
fi
grep -E "Lockstep: (NCCL backend|CUDA toolkit)" "$build/configure.log"
nccl_core=0; grep -q "NCCL backend: built" "$build/configure.log" && nccl_core=1
if ! grep -q "NCCL backend: built: CUDA/NCCL part and the LibTorch CUDA part" "$build/configure.log"; then
  note "FAIL  configure: the NCCL communicator is not built (see $build/configure.log)"
  status=1
fi
log "configured ($(elapsed))"
all_tests=${LOCKSTEP_GPU_CHECK_ALL:-0}
targets=()
bench=${LOCKSTEP_GPU_CHECK_BENCH:-1}
if [[ $all_tests != 1 ]]; then
  targets=(--target lockstep_gpu_tests)
  # The NCCL core's unit tests exist only where NCCL was found (the configure guard above says if not).
  [[ $nccl_core == 1 ]] && targets+=(lockstep_nccl_core_tests)
  [[ $bench == 1 ]] && targets+=(allreduce_bench resnet_gpu_bench)
fi
# -k 0 (Ninja) / -k (Make): every compile error in one log, not only the first translation unit's.
keep_going=(-k); [[ -f $build/build.ninja ]] && keep_going=(-k 0)
if ! cmake --build "$build" -j "$(nproc)" "${targets[@]}" -- "${keep_going[@]}" > "$build/build.log" 2>&1; then
  grep -E "error|Error" "$build/build.log" | head -60; tail -30 "$build/build.log"
  log "build failed after $(elapsed) (whole log: $build/build.log)"; exit 1
fi
log "built ($(elapsed))"

# ---- GPU tests, and the NCCL core's unit tests (label nccl: with a GPU they check a device index past
# the host's against the real driver, and the NCCL library PyTorch loads).
# A hung test must not eat a lent machine's time: the whole run is capped (default 15 min). A test
# skipped here (no usable GPU in the C++ process, a case that found too few GPUs) is a failure: CTest
# counts a skip as passed.
(cd "$build" && timeout -k 10 "${LOCKSTEP_GPU_TESTS_TIMEOUT_S:-900}" ctest -L 'gpu|nccl' --output-on-failure 2>&1 | tee gpu-tests.log)
tests_status=$?
skipped=""; grep -qE '\*\*\*Skipped|Not Run' "$build/gpu-tests.log" && skipped="; some were skipped"
if [[ $tests_status == 0 && -z $skipped ]]; then
  note "PASS  gpu tests: $(grep -E 'tests passed' "$build/gpu-tests.log")"
else
  note "FAIL  gpu tests: $(grep -E 'tests passed|tests failed' "$build/gpu-tests.log")$skipped"
  status=1
fi
# ctest prints a passing test's output only into its own log.
ran_with=$(grep -m1 -E '^gpu tests: ' "$build/Testing/Temporary/LastTest.log" 2>/dev/null)
[[ -n $ran_with ]] && note "INFO  $ran_with"
log "gpu tests done ($(elapsed))"
if [[ $all_tests == 1 ]]; then
  (cd "$build" && ctest -LE 'gpu|nccl' -j "$(nproc)" --output-on-failure > cpu-tests.log 2>&1) \
    && note "PASS  other tests: $(grep -E 'tests passed' "$build/cpu-tests.log")" \
    || { note "FAIL  other tests: $(grep -E 'tests passed|tests failed' "$build/cpu-tests.log")"; status=1; }
else
  note "SKIP  other tests (they run in CI; LOCKSTEP_GPU_CHECK_ALL=1 runs them here too)"
fi

rm -f "$build"/resnet_*.json "$build/allreduce_nccl.json"  # a rerun in the same build-gpu reports only its own
if [[ $bench != 1 ]]; then
  note "SKIP  benchmarks (LOCKSTEP_GPU_CHECK_BENCH=0)"
else
  # A hung benchmark must not use up the lease either: each command is capped (timeout's process group
  # takes mpirun's ranks with it), and a collective inside by LOCKSTEP_GPU_COMM_TIMEOUT_S where given.
  [[ -n ${LOCKSTEP_GPU_COMM_TIMEOUT_S:-} ]] && export LOCKSTEP_TIMEOUT_S=$LOCKSTEP_GPU_COMM_TIMEOUT_S
  bench_timed_out=0
  # run_bench NAME DEFAULT_LIMIT_S COMMAND...: runs COMMAND under its cap (stdin /dev/null: nothing
  # reads it, and mpirun must not stop on the terminal outside the foreground group), returns its
  # status; a timeout (124, or 137 when SIGKILL was needed 10 s later) adds a FAIL line naming NAME.
  run_bench() {
    local name=$1 limit=${LOCKSTEP_GPU_BENCH_TIMEOUT_S:-$2} begun=$SECONDS rc=0
    shift 2
    timeout -k 10 "$limit" "$@" < /dev/null || rc=$?
    bench_timed_out=0
    # 137 is also what a process killed by SIGKILL for another reason (the OOM killer) returns.
    if [[ $rc == 124 || ( $rc == 137 && $((SECONDS - begun)) -ge $limit ) ]]; then
      bench_timed_out=1
      note "FAIL  $name timed out after $limit s (exit $rc; LOCKSTEP_GPU_BENCH_TIMEOUT_S)"
      status=1
      log "$name timed out after $limit s ($(elapsed))"
    fi
    return $rc
  }

  # ---- All-reduce over NCCL beside raw ncclAllReduce (one rank per GPU).
  mpirun_flags=(--oversubscribe --bind-to none)
  [[ $(id -u) -eq 0 ]] && mpirun_flags+=(--allow-run-as-root)
  [[ -n ${LOCKSTEP_TIMEOUT_S:-} ]] && mpirun_flags+=(-x LOCKSTEP_TIMEOUT_S)
  if run_bench "NCCL all-reduce benchmark (allreduce_bench)" 180 \
       mpirun "${mpirun_flags[@]}" -np "$gpus" "$build/benchmarks/allreduce_bench" --backend nccl --min-bytes 1M \
       --max-bytes 256M --json "$build/allreduce_nccl.json"; then
    verdict=$("$PYTHON" - "$build/allreduce_nccl.json" << 'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
rows = doc["results"]
big = [r for r in rows if r["bytes"] >= 16 << 20]
correct = all(r["in_place"]["wrong"] == 0 and r["out_of_place"]["wrong"] == 0 for r in rows)
if doc.get("ranks", 0) == 1:
    # One GPU: busbw = algbw * 2(n-1)/n is 0, and NCCL returns from an in-place all-reduce of one rank
    # without launching anything, so the ratio compares Lockstep's fixed cost per call with nothing.
    over = sorted(r["overhead_us"] for r in big)[len(big) // 2]
    raw = sorted(r["raw_nccl"]["time_us"] for r in big)[len(big) // 2]
    print(("INFO" if correct else "FAIL") + f"  NCCL all-reduce at 1 rank: the busbw ratio needs >= 2 GPUs; results "
          f"{'correct' if correct else 'WRONG'}; Lockstep's cost per call {over:.1f} us over raw ncclAllReduce's {raw:.2f} us (median from 16 MB up)")
else:
    worst = min(big, key=lambda r: r["busbw_ratio"])
    ok = all(r["busbw_ratio"] >= 0.95 for r in big) and correct
    print(("PASS" if ok else "FAIL") + f"  NCCL all-reduce: worst Lockstep/raw ratio from 16 MB up {worst['busbw_ratio']:.3f} at {worst['bytes']} B (need >= 0.95)")
PY
  )
    note "$verdict"; [[ $verdict == FAIL* ]] && status=1
  elif [[ $bench_timed_out == 0 ]]; then
    note "FAIL  NCCL all-reduce benchmark did not run"; status=1
  fi

  # ---- ResNet-18 on one GPU: Lockstep beside PyTorch, same run, same GPU; NCHW (the acceptance check),
  # then channels_last (Note [Channels last]; reported, not judged).
  # A crash shows in the comparison below (no JSON); a timeout also as a FAIL line of its own, and
  # then the same program's channels_last run is skipped (it would most likely hang as well).
  run_bench "ResNet-18 Lockstep benchmark (resnet_gpu_bench)" 240 \
    "$build/benchmarks/resnet_gpu_bench" --precision fp32,bf16 --json "$build/resnet_lockstep.json"
  lockstep_hung=$bench_timed_out
  run_bench "ResNet-18 PyTorch benchmark (resnet_torch_bench.py)" 240 \
    "$PYTHON" benchmarks/resnet_torch_bench.py --precision fp32,bf16 --json "$build/resnet_torch.json"
  torch_hung=$bench_timed_out
  if [[ $nhwc == 1 ]]; then
    if [[ $lockstep_hung == 1 ]]; then
      note "SKIP  ResNet-18 Lockstep benchmark (resnet_gpu_bench) channels_last: its NCHW run timed out"
    else
      run_bench "ResNet-18 Lockstep benchmark (resnet_gpu_bench) channels_last" 240 \
        "$build/benchmarks/resnet_gpu_bench" --precision fp32,bf16 --channels-last --json "$build/resnet_lockstep_nhwc.json"
    fi
    if [[ $torch_hung == 1 ]]; then
      note "SKIP  ResNet-18 PyTorch benchmark (resnet_torch_bench.py) channels_last: its NCHW run timed out"
    else
      run_bench "ResNet-18 PyTorch benchmark (resnet_torch_bench.py) channels_last" 240 \
        "$PYTHON" benchmarks/resnet_torch_bench.py --precision fp32,bf16 --channels-last --json "$build/resnet_torch_nhwc.json"
    fi
  fi
  verdict=$("$PYTHON" - "$build/resnet_lockstep.json" "$build/resnet_torch.json" \
                        "$build/resnet_lockstep_nhwc.json" "$build/resnet_torch_nhwc.json" "$nhwc" << 'PY'
import json, sys

def load(path):
    rows = json.load(open(path))["results"]
    by = {}
    for r in rows:
        by.setdefault(r.get("impl", "lockstep"), {})[r["precision"]] = r["images_per_s"]
    return by

def compare(ours_path, theirs_path, judged, label):
    try:
        ours_all, theirs = load(ours_path), load(theirs_path).get("pytorch", {})
    except Exception as e:
        print(("FAIL" if judged else "INFO") + f"  ResNet-18{label} comparison: {e}")
        return
    ours, alone, plain = ours_all.get("lockstep", {}), ours_all.get("foreach", {}), ours_all.get("libtorch", {})
    if judged and not ours:
        print(f"FAIL  ResNet-18{label}: no Lockstep rows")
    for p in sorted(ours):
        ok = ours[p] >= theirs.get(p, float("inf"))
        extra = f"; without DataParallel {alone[p]:.1f}" if p in alone else ""
        extra += f"; LibTorch's per-parameter SGD, no DataParallel {plain[p]:.1f}" if p in plain else ""
        verdict = ("PASS" if ok else "FAIL") if judged else "INFO"
        print(verdict + f"  ResNet-18{label} {p}: Lockstep {ours[p]:.1f} images/s, PyTorch {theirs.get(p, 0):.1f} "
              f"images/s ({ours[p] / max(theirs.get(p, 1e-9), 1e-9):.3f}x){extra}")

compare(sys.argv[1], sys.argv[2], True, "")
if sys.argv[5] == "1":
    compare(sys.argv[3], sys.argv[4], False, " channels_last")
PY
  )
  while IFS= read -r line; do note "$line"; [[ $line == FAIL* ]] && status=1; done <<< "$verdict"
fi

echo
echo "==================== Lockstep GPU check ===================="
echo "PyTorch $torch_version; $gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs)"
printf '%s\n' "${summary[@]}"
echo "============================================================"
exit $status
