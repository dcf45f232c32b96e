#pragma once
// Lockstep's public surface in one include.
#include "lockstep/comm/communicator.hpp"
#include "lockstep/comm/mpi_communicator.hpp"
#include "lockstep/comm/work.hpp"
#include "lockstep/core/error.hpp"
#include "lockstep/core/world.hpp"
#include "lockstep/data/data.hpp"
#include "lockstep/ddp/comm_hooks.hpp"
#include "lockstep/ddp/data_parallel.hpp"
#include "lockstep/models/resnet.hpp"
#include "lockstep/runtime.hpp"
