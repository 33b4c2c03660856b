// Philox4x32-10 (common/philox.h) for many consecutive blocks at once, in lane arrays, so that each
// round is one vectorised loop of 32 x 32 -> 64-bit products. Host only. Included inside each CPU
// level's namespace (as host_formats.h is), so every level's build keeps its own vectorised copy.

// Words of blocks [b0, b0 + nb) into out[0 .. 4 nb): out[4 q + i] is word i of block b0 + q.
inline void philox_words(const PhiloxStream& ps, uint64_t b0, int64_t nb, uint32_t* out) {
  constexpr int kLanes = 16;
  for (int64_t q0 = 0; q0 < nb; q0 += kLanes) {
    // 64-bit lanes holding 32-bit values: the products are the vectorisable 32 x 32 -> 64 kind
    uint64_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t b = b0 + static_cast<uint64_t>(q0 + l);
      c0[l] = b & 0xffffffffu;
      c1[l] = b >> 32;
      c2[l] = ps.h0;
      c3[l] = ps.h1;
    }
    uint64_t k0 = ps.k0, k1 = ps.k1;
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t p0 = (c0[l] & 0xffffffffu) * uint64_t{0xD2511F53u};
        const uint64_t p1 = (c2[l] & 0xffffffffu) * uint64_t{0xCD9E8D57u};
        const uint64_t n0 = ((p1 >> 32) ^ c1[l] ^ k0) & 0xffffffffu;
        const uint64_t n2 = ((p0 >> 32) ^ c3[l] ^ k1) & 0xffffffffu;
        c0[l] = n0;
        c1[l] = p1 & 0xffffffffu;
        c2[l] = n2;
        c3[l] = p0 & 0xffffffffu;
      }
      k0 = (k0 + 0x9E3779B9u) & 0xffffffffu;
      k1 = (k1 + 0xBB67AE85u) & 0xffffffffu;
    }
    const int64_t ql = nb - q0 < kLanes ? nb - q0 : kLanes;
    for (int64_t l = 0; l < ql; ++l) {
      uint32_t* o = out + 4 * (q0 + l);
      o[0] = static_cast<uint32_t>(c0[l]);
      o[1] = static_cast<uint32_t>(c1[l]);
      o[2] = static_cast<uint32_t>(c2[l]);
      o[3] = static_cast<uint32_t>(c3[l]);
    }
  }
}
