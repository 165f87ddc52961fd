// Everything the per-ISA kernel bodies need from outside, included before any `#pragma GCC target`
// so that library headers are compiled for the baseline instruction set.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "lstm_cell.h"
#include "lstm_layout.h"
