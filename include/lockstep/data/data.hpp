#pragma once
// The data layer in one include: datasets, sharded sampling and the prefetching loader.

#include "lockstep/data/augment.hpp"
#include "lockstep/data/cifar10.hpp"
#include "lockstep/data/dataset.hpp"
#include "lockstep/data/image_dataset.hpp"
#include "lockstep/data/loader.hpp"
#include "lockstep/data/mnist.hpp"
#include "lockstep/data/sharded_sampler.hpp"
#include "lockstep/data/subset.hpp"
#include "lockstep/data/synthetic_dataset.hpp"
