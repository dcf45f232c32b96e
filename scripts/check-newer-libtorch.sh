#!/usr/bin/env bash
# Compile-checks (syntax only, no linking) every translation unit of Lockstep against the headers of a
# newer LibTorch than Debian 12's 1.13: Debian sid's libtorch-dev (2.14 when this was written), which
# also carries ATen/cuda and c10/cuda, so the CUDA parts are checked too. The GPU path must build
# against the LibTorch 2.x inside PyTorch; this finds API breakage without a GPU machine (it found the
# C++20 requirement, autograd's intrusive_ptr nodes and Module's non-virtual base before the first
# H200 run). Not part of CI: sid moves. Needs network access to deb.debian.org.
#
#   ./scripts/check-newer-libtorch.sh                  # every translation unit (~10 min on 2 cores)
#   ./scripts/check-newer-libtorch.sh 'src/ddp/|gpu'   # those whose path matches the regex
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
filter=${1:-.}
cache=$root/.cache/newer-libtorch
build=$root/build-headers
mkdir -p "$cache/lists/partial" "$cache/archives/partial"

# sid's package lists, in a folder of their own (the system's apt state is not touched).
cat > "$cache/sources.list" << 'LIST'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
LIST
apt_opts=(-o Dir::Etc::sourcelist="$cache/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$cache/lists"
          -o Dir::Cache="$cache" -o APT::Architecture=amd64 -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update > "$cache/update.log" 2>&1 || { cat "$cache/update.log"; exit 1; }
version=$(apt-cache "${apt_opts[@]}" show --no-all-versions libtorch-dev | awk '/^Version:/ {print $2}')
headers=$cache/libtorch-dev-$version
if [[ ! -d $headers/usr/include/torch ]]; then
  (cd "$cache" && apt-get "${apt_opts[@]}" download "libtorch-dev=$version" > /dev/null)
  rm -rf "$headers" && dpkg-deb -x "$cache"/libtorch-dev_*"${version#*:}"*.deb "$headers"
fi
# The CPU package lacks this generated header; it only defines an export macro.
mkdir -p "$headers/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$headers/stub/c10/cuda/impl/cuda_cmake_macros.h"
echo "check-newer-libtorch: LibTorch headers $version from Debian sid"

# The compile commands of the normal build (CPU LibTorch 1.13), with its torch include paths swapped.
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DLOCKSTEP_USE_PCH=OFF > /dev/null
python3 - "$build/compile_commands.json" "$headers" "$filter" "$(nproc)" << 'PY'
import json, os, re, shlex, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
commands, headers, pattern, jobs = json.load(open(sys.argv[1])), sys.argv[2], re.compile(sys.argv[3]), int(sys.argv[4])
include = headers + "/usr/include"

def argv(entry):
    # CMake writes "command" (one shell-quoted string: `c++ FLAGS -o OBJECT -c SOURCE`); other tools
    # write "arguments" (a list). The object (-o X) and the source (-c X, or the source path anywhere)
    # are dropped, and the source is given once at the end: twice, the compiler would check it twice.
    args = shlex.split(entry["command"]) if "command" in entry else list(entry["arguments"])
    source = os.path.normpath(os.path.join(entry["directory"], entry["file"]))
    out, skip = [], False
    for i, a in enumerate(args[1:], 1):
        if skip:
            skip = False
            continue
        if a == "-o":
            skip = True  # and the object file after it
            continue
        if a == "-c":
            skip = i + 1 < len(args) and not args[i + 1].startswith("-")  # and the source after it (CMake's order)
            continue
        if os.path.normpath(os.path.join(entry["directory"], a)) == source:
            continue
        if a.startswith("-std="):
            continue  # a build's -std=gnu++17 (were there one) would override the -std=gnu++20 below
        if a == "/usr/include/torch/csrc/api/include":
            a = include + "/torch/csrc/api/include"
        out.append(a)
    # Newer LibTorch needs C++20 (Note [C++ standard] in CMakeLists.txt); its headers come first.
    return [args[0], "-std=gnu++20", "-fsyntax-only", "-isystem", include, "-isystem", headers + "/stub"] + out + ["-c", source]

def check(entry):
    r = subprocess.run(argv(entry), cwd=entry["directory"], capture_output=True, text=True)
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    print(("FAIL " if r.returncode else "ok   ") + entry["file"], flush=True)
    for line in errors[:10]:
        print("     " + line, flush=True)
    return r.returncode == 0

todo = sorted({e["file"]: e for e in commands if pattern.search(e["file"])}.values(), key=lambda e: e["file"])
print(f"check-newer-libtorch: {len(todo)} translation units, {jobs} at a time", flush=True)
with ThreadPoolExecutor(jobs) as pool:
    results = list(pool.map(check, todo))
failed = results.count(False)
print(f"check-newer-libtorch: {len(todo) - failed} compiled, {failed} failed")
sys.exit(1 if failed else 0)
PY
