#pragma once
// Note [Atomic checkpoint]: files a resumed run or a user will read (checkpoints, exported models)
// are written under a temporary name, synced, then renamed. rename is atomic within a file system,
// so a reader sees either the old file or the new complete one, never a partial file under the
// final name; the syncs make sure that after a crash the renamed file has its data, not only its name.
// Defined in checkpoint.cpp.

#include <functional>
#include <string>

namespace lockstep::train {

// Creates `path`'s directory if needed, calls `write(temporary)` to write the content to a
// temporary file beside `path`, and moves it to `path` atomically.
void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write);

}  // namespace lockstep::train
