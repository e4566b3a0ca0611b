// The rank-r kernels (cpu_lowrank.h) with vectors of 16 floats; see cpu_lowrank_impl.h.
#define DK_LOWRANK_VW 16
#define DK_LOWRANK_NAME lowrank_avx512
#define DK_LOWRANK_ISA "avx512"
#include "cpu_lowrank_impl.h"
