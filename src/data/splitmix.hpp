#pragma once
// A small, self-contained PRNG for everything in data/ that must be reproducible: shuffles, augmentation,
// synthetic samples. It is ours rather than torch's global generator so that (a) a given (seed, epoch, index)
// always yields the same numbers on every rank and every run, and (b) other code drawing random numbers
// (dropout, weight init) cannot shift the data order. SplitMix64 (Steele, Lea & Flood 2014) is tiny, fast,
// and passes BigCrush; statistical quality beyond that does not matter for shuffling images.

#include <cstdint>

namespace lockstep {
namespace data {
namespace detail {

// The SplitMix64 output function: a bijective 64-bit mixer.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Who draws: one config seed (trainer.seed) seeds the sampler, the augmentation and the synthetic data
// set alike, and their coordinates overlap (epoch 1 and sample i for Augment; stream 1 and sample i
// for SyntheticDataset's labels). Without a domain of its own each, sample i's first crop offset was
// its label's own draw: the shift encoded the class.
enum class Domain : uint64_t { Shuffle = 0, Augment = 1, Synthetic = 2 };

// Derives an independent stream seed from a base seed and up to two coordinates (epoch, index, ...),
// in `domain`. Each step goes through the mixer so that nearby coordinates give unrelated streams.
inline uint64_t stream_seed(Domain domain, uint64_t seed, uint64_t a, uint64_t b = 0) {
  constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
  uint64_t h = mix64(seed + kGolden);
  if (domain != Domain::Shuffle) h = mix64(h ^ mix64(static_cast<uint64_t>(domain) + 4 * kGolden));
  h = mix64(h ^ (a + 2 * kGolden));
  return mix64(h ^ (b + 3 * kGolden));
}

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return mix64(state_);
  }

  // Uniform in [0, bound) by Lemire's multiply-high; the bias (at most bound / 2^64) is far below
  // anything a data pipeline could notice, and it avoids a rejection loop.
  uint64_t below(uint64_t bound) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * bound) >> 64);
  }

 private:
  uint64_t state_;
};

}  // namespace detail
}  // namespace data
}  // namespace lockstep
