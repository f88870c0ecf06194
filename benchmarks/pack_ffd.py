"""Benchmark first-fit-decreasing packing on paper-like sample lengths.

A sample is 144 visual tokens + its caption tokens + 2 (BOS/EOS), packed into 4096-token
sequences. Captions are drawn from a lognormal around 30 tokens, clipped to 5..128. The fast
packer runs on `--n` samples; both packers run on `--naive-n` samples, must agree there, and
their times on that same input give the speed ratio.

    .venv/bin/python benchmarks/pack_ffd.py [--n 10000000] [--naive-n 150000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from oqvl.pack.ffd import fill_ratio, first_fit_decreasing, naive_first_fit_decreasing

VISUAL_TOKENS = 144
SPECIAL_TOKENS = 2  # BOS + EOS


def paper_like_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sample lengths in tokens: visual + caption (lognormal, median 30, clipped) + BOS/EOS."""
    caption = np.clip(np.rint(rng.lognormal(np.log(30), 0.5, n)), 5, 128).astype(np.int64)
    return VISUAL_TOKENS + caption + SPECIAL_TOKENS


def timed(pack: Callable, lengths: np.ndarray, capacity: int) -> tuple[list, float]:
    start = time.perf_counter()
    bins = pack(lengths, capacity)
    return bins, time.perf_counter() - start


def report(name: str, lengths: np.ndarray, bins: list, seconds: float, capacity: int) -> None:
    print(f"{name:<6} n={lengths.size:>11,}  {seconds:9.2f} s  {lengths.size / seconds:>13,.0f} samples/s  "
          f"bins={len(bins):>9,}  fill={fill_ratio(lengths, bins, capacity):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000, help="samples for the fast packer")
    parser.add_argument("--naive-n", type=int, default=150_000,
                        help="samples for the fast vs naive comparison (naive is O(n * bins))")
    parser.add_argument("--capacity", type=int, default=4096, help="context length in tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    big = paper_like_lengths(args.n, rng)
    small = paper_like_lengths(args.naive_n, rng)
    print(f"capacity={args.capacity}  seed={args.seed}  mean length={big.mean():.1f}  "
          f"distinct lengths={np.unique(big).size}")

    print(f"-- fast on n={args.n:,}")
    bins, seconds = timed(first_fit_decreasing, big, args.capacity)
    report("fast", big, bins, seconds, args.capacity)

    print(f"-- fast vs naive on the same n={args.naive_n:,}")
    fast_bins, fast_s = timed(first_fit_decreasing, small, args.capacity)
    report("fast", small, fast_bins, fast_s, args.capacity)
    naive_bins, naive_s = timed(naive_first_fit_decreasing, small, args.capacity)
    report("naive", small, naive_bins, naive_s, args.capacity)
    same = [b.tolist() for b in fast_bins] == naive_bins
    print(f"identical bins: {same}  speed ratio fast/naive: {naive_s / fast_s:,.0f}x")
    if not same:
        raise SystemExit("fast and naive packings differ")


if __name__ == "__main__":
    main()
