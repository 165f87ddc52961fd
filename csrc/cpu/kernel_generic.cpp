// Baseline build (SSE2 on x86-64, whatever the compiler targets elsewhere).
#include "cpu/kernel_prelude.h"

#define L2L_ISA generic
#define L2L_ISA_NAME "generic"
#define L2L_VEC_BYTES 16
#define L2L_X86_RCP 0
#define L2L_TILE_VECTORS 2
#include "cpu/kernel_body.inc"
