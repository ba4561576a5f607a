#pragma once
// The registry of optimizers (optimizer_traits.h, [note: optimizer traits]): every op, kernel, plan
// and Python descriptor is made for each optimizer listed here.

#include "optimizer_traits.h"
#include "optimizers/adam.h"
#include "optimizers/lion.h"
#include "optimizers/sgd.h"

namespace fusedlr {

using Optimizers = OptimizerList<Sgd, Adam, Lion>;

}  // namespace fusedlr
