#pragma once
// Note [Atomic checkpoint]: files a resumed run or a user will read (checkpoints, exported models)
// are written under a temporary name, synced, then renamed. rename is atomic within a file system,
// so a reader sees either the old file or the new complete one, never a partial file under the
// final name; the syncs make sure that after a crash the renamed file has its data, not only its name.
// Defined in checkpoint.cpp.

#include <functional>
#include <string>

namespace lockstep::train {

struct TrainerContext;

// Creates `path`'s directory if needed, calls `write(temporary)` to write the content to a
// temporary file beside `path`, and moves it to `path` atomically.
void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write);

// Note [A failed checkpoint]: the files rank 0 alone writes (checkpoints, metrics.jsonl, exported
// models) are written through this: `work` runs on rank 0, and its error, should it throw, is raised
// on every rank as "<context>: <what> (on rank 0; this is rank N)" (comm::run_on_root). Collective;
// without a communicator in ctx (a context built by hand) rank 0 just runs `work`.
void run_on_rank0(const TrainerContext& ctx, const std::function<void()>& work, const std::string& context);

}  // namespace lockstep::train
