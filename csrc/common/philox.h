// Counter-based random numbers, written once for host and device: Philox4x32-10 (Salmon et al.,
// SC'11; the generator of cuRAND and Random123), keyed as mergekit_fast/methods/rng.py documents:
//   key     = (seed mod 2^32, seed >> 32)
//   counter = (block mod 2^32, block >> 32, h mod 2^32, h >> 32), block = j / 4
//   h       = FNV-1a 64 of the tensor name, a zero byte and the 4-byte little-endian stream
// Element j takes word j % 4 of its block; a uniform is (word >> 8) * 2^-24, exact in fp32, and a
// Bernoulli(p) draw keeps where uniform < p (fp32 compare). The torch implementation computes the
// same words bit for bit (tests/test_rng.py checks both against Random123's known answers).
#pragma once
#include <cstdint>

#include "hd.h"

namespace mkf {

struct Philox4 {
  uint32_t v[4];
};

MKF_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

MKF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, &hi0, &lo0);
    philox_mulhilo(0xCD9E8D57u, c2, &hi1, &lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// FNV-1a 64 of `name` (n bytes), a zero byte and `stream` as 4 little-endian bytes.
inline uint64_t philox_stream_hash(const char* name, int64_t n, uint32_t stream) {
  uint64_t h = 0xCBF29CE484222325ull;
  auto mix = [&h](uint8_t byte) { h = (h ^ byte) * 0x100000001B3ull; };
  for (int64_t i = 0; i < n; ++i) mix(static_cast<uint8_t>(name[i]));
  mix(0);
  for (int b = 0; b < 4; ++b) mix(static_cast<uint8_t>(stream >> (8 * b)));
  return h;
}

// The draws of one stream: what a kernel needs to compute word j of any element.
struct PhiloxStream {
  uint32_t k0, k1, h0, h1;

  MKF_HD Philox4 block(uint64_t b) const {
    return philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), h0, h1, k0, k1);
  }
  MKF_HD uint32_t word(uint64_t j) const { return block(j >> 2).v[j & 3]; }
  // uniform in [0, 1): 24 random bits, exact in fp32
  MKF_HD static float uniform_of(uint32_t w) { return static_cast<float>(w >> 8) * 5.9604644775390625e-08f; }
  MKF_HD float uniform(uint64_t j) const { return uniform_of(word(j)); }
};

inline PhiloxStream philox_stream(uint64_t seed, uint64_t hash) {
  return PhiloxStream{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                      static_cast<uint32_t>(hash), static_cast<uint32_t>(hash >> 32)};
}

}  // namespace mkf
