// Host-only exhaustive check of KeyRangeMask's block arithmetic (common/mask.cuh) against the
// element-wise definition of the mask, over random shapes, alignments, windows and tile sizes:
//   key_block_range          = the blocks holding at least one visible (row, key) pair
//   unmasked_key_block_range = exactly the blocks where tile_fully_allowed holds, and those
//                              blocks have every (row, key) visible
//   query_row_range          = the rows that see at least one key of a key block
// and the forward's three-phase block loop visits each block of key_block_range exactly once,
// unmasked only inside unmasked_key_block_range. Exit status 1 on the first mismatch.
#include <cstdio>
#include <random>

#include "flash_jax/common/mask.cuh"

using flash_jax::AttentionParams;
using flash_jax::KeyRangeMask;

int main() {
  std::mt19937 rng(7);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int checked = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    AttentionParams p{};
    p.seqlen_q = pick(1, 300);
    p.seqlen_k = pick(0, 300);
    p.causal = pick(0, 1);
    p.causal_top_left = pick(0, 1);
    p.window_left = pick(0, 2) ? -1 : pick(0, 120);
    p.window_right = pick(0, 2) ? -1 : pick(0, 120);
    const KeyRangeMask mask = KeyRangeMask::make(p, 0);
    const int block_m = 16 << pick(0, 3), block_n = 16 << pick(0, 4);
    const int offset = p.causal_top_left ? 0 : p.seqlen_k - p.seqlen_q;
    auto visible = [&](int i, int j) {
      if (p.causal && j > i + offset) return false;
      if (p.window_left >= 0 && j < i + offset - p.window_left) return false;
      if (p.window_right >= 0 && j > i + offset + p.window_right) return false;
      return j >= 0 && j < p.seqlen_k;
    };
    for (int i = 0; i < p.seqlen_q; ++i)
      for (int j = 0; j < p.seqlen_k; ++j)
        if (mask.allowed(i, j) != visible(i, j)) {
          std::printf("allowed(%d, %d) wrong\n", i, j);
          return 1;
        }
    const int n_blocks = (p.seqlen_k + block_n - 1) / block_n;
    for (int row_begin = 0; row_begin < p.seqlen_q; row_begin += block_m) {
      const int row_end = std::min(row_begin + block_m, p.seqlen_q);
      int begin, end, unmasked_begin, unmasked_end;
      mask.key_block_range(row_begin, row_end, block_n, &begin, &end);
      mask.unmasked_key_block_range(row_begin, row_end, block_n, &unmasked_begin, &unmasked_end);
      for (int n = 0; n < n_blocks + 2; ++n) {
        bool any = false, all = n < n_blocks;
        for (int i = row_begin; i < row_end; ++i)
          for (int j = n * block_n; j < (n + 1) * block_n; ++j) {
            const bool v = visible(i, j);
            any |= v;
            all &= v;
          }
        const bool in_range = n >= begin && n < end;
        const bool in_unmasked = n >= unmasked_begin && n < unmasked_end;
        const bool fully = mask.tile_fully_allowed(row_begin, row_end, n * block_n, (n + 1) * block_n);
        if ((any && !in_range) || (in_range && n >= n_blocks) || in_unmasked != all ||
            (n < n_blocks && fully != all)) {
          std::printf("block mismatch: sq %d sk %d causal %d top_left %d window (%d, %d) rows "
                      "[%d, %d) n %d (block_n %d): any %d all %d range [%d, %d) unmasked [%d, %d)\n",
                      p.seqlen_q, p.seqlen_k, p.causal, p.causal_top_left, p.window_left,
                      p.window_right, row_begin, row_end, n, block_n, any, all, begin, end,
                      unmasked_begin, unmasked_end);
          return 1;
        }
      }
      // The forward's loop: each block of [begin, end) once, unmasked ones all visible.
      int visits[512] = {};
      int n = end - 1;
      for (; n >= begin && n >= unmasked_end; --n) ++visits[n];
      for (; n >= begin && n >= unmasked_begin; --n) {
        if (!(n < unmasked_end)) {
          std::printf("unmasked phase left its range\n");
          return 1;
        }
        ++visits[n];
      }
      for (; n >= begin; --n) ++visits[n];
      for (int b = 0; b < 512; ++b)
        if (visits[b] != (b >= begin && b < end ? 1 : 0)) {
          std::printf("loop visits block %d %d times\n", b, visits[b]);
          return 1;
        }
      ++checked;
    }
    for (int col_begin = 0; col_begin < p.seqlen_k; col_begin += block_n) {
      const int col_end = std::min(col_begin + block_n, p.seqlen_k);
      int first_row, end_row;
      mask.query_row_range(col_begin, col_end, &first_row, &end_row);
      for (int i = 0; i < p.seqlen_q; ++i) {
        bool any = false;
        for (int j = col_begin; j < col_end; ++j) any |= visible(i, j);
        if (any && !(i >= first_row && i < end_row)) {
          std::printf("query_row_range misses row %d\n", i);
          return 1;
        }
      }
    }
  }
  std::printf("mask_check: %d query blocks checked, all consistent\n", checked);
  return 0;
}
