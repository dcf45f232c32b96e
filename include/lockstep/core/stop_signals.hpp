#pragma once
// Signals that ask a training run to stop cleanly instead of dying mid-step: a batch scheduler's
// SIGTERM before the kill (SLURM waits KillWait, 30 s by default), SIGUSR1 from `sbatch --signal` or
// from `kill -USR1 <mpirun pid>` (mpirun forwards SIGUSR1 and SIGUSR2 to every rank). While a
// StopSignals guard lives, a first such signal only raises a flag; the trainer agrees on it across
// ranks, ends after the step, and writes its checkpoint (Note [Stop on signal] in trainer.cpp). A
// second one of the same signal takes its default action (SA_RESETHAND): a user who insists still
// ends the process at once.

#include <string>
#include <vector>

namespace lockstep {

// "SIGTERM", "TERM", "sigusr1" or "10" -> the signal's number. Accepted: HUP, INT, QUIT, TERM, USR1,
// USR2, XCPU (what schedulers and terminals send). Anything else is a lockstep::Error naming `who`
// (e.g. the config key; empty: no prefix) and the text.
int signal_number(const std::string& name, const std::string& who = "signal");
// 15 -> "SIGTERM"; an unknown number -> "signal 42".
std::string signal_name(int signal);

// RAII: catches `signals` (names as signal_number takes them) for its lifetime, restoring the
// previous handlers when it ends. Note [Signal ownership]: a signal whose handler is not the default
// one when the guard starts (the program set its own, or ignores it) is left alone, so a guard never
// takes a signal away from code that wanted it. Guards may nest (two trainers one after the other,
// or one inside a program's own guard) and may end in any order (the last one using a signal puts
// the default back); they share one flag.
class StopSignals {
 public:
  explicit StopSignals(const std::vector<std::string>& signals);
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The first signal caught since the outermost guard started (0: none). Any thread; never blocks.
  int caught() const;
  // The signals this guard catches (those it could take), as numbers.
  const std::vector<int>& installed() const { return installed_; }

 private:
  std::vector<int> installed_;
  std::vector<int> owned_;  // installed by this guard: restored by it
};

}  // namespace lockstep
