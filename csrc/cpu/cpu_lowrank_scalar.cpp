// The rank-r kernels (cpu_lowrank.h) with vectors of 4 floats; see cpu_lowrank_impl.h.
#define DK_LOWRANK_VW 4
#define DK_LOWRANK_NAME lowrank_scalar
#define DK_LOWRANK_ISA "scalar"
#include "cpu_lowrank_impl.h"
