// The rank-r kernels (cpu_lowrank.h) with vectors of 8 floats; see cpu_lowrank_impl.h.
#define DK_LOWRANK_VW 8
#define DK_LOWRANK_NAME lowrank_avx2
#define DK_LOWRANK_ISA "avx2"
#include "cpu_lowrank_impl.h"
