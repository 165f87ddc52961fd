// CPU model of mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 for the emulated kernels: the 32 lanes
// of a warp (std::threads) each hand in their fragments, meet at a barrier, and each takes its part of
// D = A B + C, gathered through the fragment layouts of the PTX ISA ("Matrix fragments for mma.m16n8k8",
// .tf32; the same as CuTe's SM80_16x8x8_F32TF32TF32F32_TN traits):
//   lane = 4 groupID + tig (threadID_in_group)
//   A (16 x 8, row-major): a_i at row groupID + 8 (i % 2), col tig + 4 (i / 2)
//   B (8 x 8, "col"):      b_i at row (k) tig + 4 i, col (n) groupID
//   C, D (16 x 8):         c_i at row groupID + 8 (i / 2), col 2 tig + (i % 2)
// tests/test_cuda_emulated.py checks this model against an independent statement of the same table with
// a matmul of distinct values, so an index error here fails there.
//
// Arithmetic: operands are read as TF32 (the low 13 bits ignored, as the hardware is described to do; the lo
// parts of mma_tf32.h's split_tf32_lo_unrounded, the forward's layer inputs and every operand of the backward,
// are handed over unrounded, and its error analysis allows for this truncation, the worst case), products are
// exact in float32 (11 x 11 significant bits), and each row-column sum is c + a_0 b_0 + ... + a_7 b_7 in
// float32, in that order, rounding to nearest. The GPU's accumulation order and rounding are not specified
// (published measurements: truncation); the error analysis in csrc/cuda/mma_tf32.h allows for it, the GPU tests
// check it.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "cuda/mma_tf32.h"

namespace l2l_fast {
namespace cuda {

struct MmaLayout {
  static int a_row(int lane, int i) { return lane / 4 + 8 * (i % 2); }
  static int a_col(int lane, int i) { return lane % 4 + 4 * (i / 2); }
  static int b_row(int lane, int i) { return lane % 4 + 4 * i; }
  static int b_col(int lane, int) { return lane / 4; }
  static int c_row(int lane, int i) { return lane / 4 + 8 * (i / 2); }
  static int c_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }
};

// A reusable barrier of `count` threads.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation != generation_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_, arrived_ = 0, generation_ = 0;
};

inline float tf32_operand(float x) {
  return bits_to_float(float_to_bits(x) & 0xffffe000u);
}

// The exchange of one warp: every lane must call mma() the same number of times (mma.sync's convergence).
class WarpMma {
 public:
  explicit WarpMma(int lanes = 32) : barrier_(lanes) {}

  // __syncwarp: every lane of the warp arrives (the same barrier as mma's, so the two stay in step).
  void sync() { barrier_.wait(); }

  // __shfl_sync / __ballot_sync over every lane: each lane posts its value, all meet, each reads.
  float shfl(int lane, float v, int src) {
    posted_[lane] = v;
    barrier_.wait();
    const float got = posted_[src];
    barrier_.wait();  // every lane has read: the next exchange may overwrite
    return got;
  }
  unsigned ballot(int lane, bool p) {
    posted_[lane] = p ? 1.0f : 0.0f;
    barrier_.wait();
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (posted_[l] != 0.0f ? 1u : 0u) << l;
    barrier_.wait();
    return bits;
  }

  void mma(int lane, FragA& acc, const FragA& a, const FragB& b) {
    for (int i = 0; i < 4; ++i) a_[lane][i] = tf32_operand(a.v[i]);
    for (int i = 0; i < 2; ++i) b_[lane][i] = tf32_operand(b.v[i]);
    barrier_.wait();  // every lane's fragments are in
    float A[16][8], B[8][8];
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) A[MmaLayout::a_row(l, i)][MmaLayout::a_col(l, i)] = a_[l][i];
      for (int i = 0; i < 2; ++i) B[MmaLayout::b_row(l, i)][MmaLayout::b_col(l, i)] = b_[l][i];
    }
    for (int i = 0; i < 4; ++i) {
      const int row = MmaLayout::c_row(lane, i), col = MmaLayout::c_col(lane, i);
      float sum = acc.v[i];
      for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];
      acc.v[i] = sum;
    }
    barrier_.wait();  // every lane has read them: the next call may overwrite
  }

 private:
  Barrier barrier_;
  float a_[32][4];
  float b_[32][2];
  float posted_[32] = {};
};

}  // namespace cuda
}  // namespace l2l_fast
