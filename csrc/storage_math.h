#pragma once
// How a parameter and its optimizer state are kept in memory, shared by the CPU and CUDA kernels:
// the conversions between the stored types and the math type, stochastic rounding and its random
// bits, and float32 master weights kept as remainders. The update math (update_math.h,
// optimizers/) sees the math type only.
//
// [note: storage]
// A tensor's update reads its parameter (from the master weight where it has one) and its state
// into the math type (float32 for low-precision parameters, float64 for float64 ones), updates
// them in registers and stores them back. What "stores back" means is the tensor's storage:
//  - the state: in the math type, or in bfloat16 (state_dtype=torch.bfloat16: 2 bytes instead of
//    4 per value), rounded to nearest or, with stochastic rounding, stochastically;
//  - a bfloat16 or float16 parameter without a master weight: rounded to nearest or stochastically;
//  - a parameter with a float32 master weight: the master holds the value, the parameter its
//    rounding (for bfloat16, to nearest with ties away from zero, see [note: remainders]);
//  - a bfloat16 parameter with a remainder: the parameter and the int16 remainder together are
//    the float32 master, bit for bit.
//
// [note: remainders]
// A float32 number is its top 16 bits (a bfloat16) and its low 16 bits. Rounded to nearest with
// ties away from zero, the top half becomes the bfloat16 parameter and the float32 difference to
// it, as a signed count of low-half units, lies in [-2^15, 2^15): it is the int16 remainder, and
// the parameter and remainder give back the float32 exactly. Ties to even cannot be kept this way:
// 2^16 + 1 float32 values round to each even bfloat16 (the tie below it and the one above it both
// do), one more than 16 bits tell apart. So the bfloat16 parameter of a float32 master is rounded
// with ties away from zero both with master_weights=True and with remainders, and the two runs are
// the same, bit for bit. (The two roundings differ on exact ties only, one float32 in 2^16.)
//
// [note: stochastic rounding]
// Rounding x stochastically to a type of fewer bits gives the representable neighbour above |x|
// with probability (|x| - below) / (above - below), else the one below: the expected value is x,
// so many small updates add up where round-to-nearest drops each one. The random bits of element
// e of a tensor come from a counter-based generator, a hash of (key, e), where the key hashes the
// group's rounding seed, the tensor's index in the step's lists, its step count and which value is
// rounded (the parameter, a pair of bfloat16 state lists: state_stream, or an 8-bit state list:
// mx_state_stream). The bits depend on nothing
// else: not the thread count, the chunking, the device or the order in which elements are
// visited, so a run is reproducible, the same on the CPU and CUDA, and resumes from a checkpoint
// (the seed is a group setting and the step count is state) as it would have gone on, in the same
// version of fusedlr (the generator is fusedlr's own; it changed once, for speed). NaN stays NaN,
// infinities stay infinite, and a finite value beyond the largest finite one of the type rounds
// as to nearest.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "macros.h"

namespace fusedlr {

// The bits of a value as another type of its size (memcpy: what nvcc and gcc compile to a move).
template <typename To, typename From>
FUSEDLR_HD To bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To out;
  std::memcpy(&out, &value, sizeof out);
  return out;
}

FUSEDLR_HD uint32_t float_bits(float x) { return bit_cast<uint32_t>(x); }
FUSEDLR_HD float float_of_bits(uint32_t bits) { return bit_cast<float>(bits); }

// ---------------------------------------------------------------------------------------------
// Random bits ([note: stochastic rounding])

// Bijective mixes of 32 and 64 bits (multiply-xorshift finalizers): every input bit affects every
// output bit about half the time.
FUSEDLR_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

FUSEDLR_HD uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

// The key of the random bits of one value list of one tensor at one step: stream 0 rounds the
// parameter, stream 1 + j bfloat16 state lists 2j and 2j + 1 (state_stream) or 8-bit state list j
// (mx_state_stream).
FUSEDLR_HD uint64_t rounding_key(uint64_t seed, int64_t tensor, int64_t step, int stream) {
  uint64_t key = mix64(seed + 0x9e3779b97f4a7c15ull);
  key = mix64(key ^ static_cast<uint64_t>(tensor));
  key = mix64(key ^ static_cast<uint64_t>(step));
  return mix64(key ^ static_cast<uint64_t>(stream));
}

// 32 random bits for element `element` under `key`: one round of 32-bit mixing (vectorizable on
// the CPU, cheap on a GPU) of the index's low half, spread by an odd multiplier, xor a 32-bit
// stream value that folds the key's two halves and the index's high half together. A RandomStream
// is that value for the elements that share an index's high half (the CPU loops take it once per
// chunk: a chunk never spans two). Each element's bits are uniform over keys (for a fixed index,
// the mix is a bijection of the stream value), which is what makes stochastic rounding unbiased;
// the multiplier evens the bytes of consecutive elements' bits (without it, over 2^20 consecutive
// indices, a byte of the high half was measurably uneven: a mean chi-square of 270 for 255 degrees
// of freedom). The key enters as 32 bits: two keys whose halves fold alike give the same bits, so
// over many tensors and steps some (tensor, step) pairs repeat another's pattern, which leaves
// every rounding unbiased. A former second round of mixing, keyed by the key's high half, cost
// the CPU's stochastic-rounding step 4% of its time (GPT-2 small in bf16: 101 ms against 97).
struct RandomStream {
  uint32_t value;
};

// The odd multiplier that spreads the index's halves (2^32 over the golden ratio). A loop over
// consecutive elements may keep the spread low half as a running sum (adding kIndexSpread per
// element) and call random_bits_spread: the same bits without a multiplication per element.
inline constexpr uint32_t kIndexSpread = 0x9e3779b9u;

FUSEDLR_HD RandomStream random_stream(uint64_t key, int64_t element) {
  const uint32_t element_high = static_cast<uint32_t>(static_cast<uint64_t>(element) >> 32);
  return {static_cast<uint32_t>(key) ^ static_cast<uint32_t>(key >> 32) ^ (element_high * kIndexSpread)};
}

FUSEDLR_HD uint32_t random_bits_spread(RandomStream stream, uint32_t spread_index) {
  return mix32(spread_index ^ stream.value);
}

FUSEDLR_HD uint32_t random_bits(RandomStream stream, uint32_t element_low) {
  return random_bits_spread(stream, element_low * kIndexSpread);
}

FUSEDLR_HD uint32_t random_bits(uint64_t key, int64_t element) {
  return random_bits(random_stream(key, element), static_cast<uint32_t>(element));
}

// State lists round in bfloat16, 16 random bits each, so they share draws by pairs: lists 2j and
// 2j + 1 take the low and the high half of the 32 bits of stream state_stream(2j) (one hash for two
// roundings; the parameter has stream 0 to itself, a float16 rounding takes all 32 bits).
FUSEDLR_HD constexpr int state_stream(int list) { return 1 + list / 2; }
FUSEDLR_HD uint32_t state_random_bits(uint32_t stream_bits, int list) { return stream_bits >> (16 * (list & 1)); }

// ---------------------------------------------------------------------------------------------
// Conversions between float32 and bfloat16 or float16, and their roundings

// Every conversion below is branch-free: each choice of a value is either a conditional
// expression between values already computed by integer operations, which the compilers make a
// select (in the CPU loops, a compare into a mask register and a masked move or blend), or, where
// a compiler would compute a candidate only when it is taken and so leave a branch that stops the
// loops' vectorization (a candidate computed by floating-point operations: float16's conversions
// and its stochastic rounding), a select by a mask made in integer arithmetic. A select by a
// compare costs a fraction of a mask made in arithmetic: with the NaN checks so made, an AdamW
// step with stochastic rounding and bfloat16 state took 1.25x its time in the caches.

// All ones where a >= b, else zero, for a and b below 2^31 (float magnitudes as bits).
FUSEDLR_HD uint32_t mask_at_least(uint32_t a, uint32_t b) {
  return ~static_cast<uint32_t>(static_cast<int32_t>(a - b) >> 31);
}

FUSEDLR_HD uint32_t select_bits(uint32_t mask, uint32_t if_set, uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}

// x where `mask` is all ones, y where it is zero, bit for bit: a select in arithmetic, so a loop
// over it has no branch to vectorize around (update_math.h, lerp).
FUSEDLR_HD float select_by_mask(uint32_t mask, float x, float y) {
  return float_of_bits(select_bits(mask, float_bits(x), float_bits(y)));
}

FUSEDLR_HD double select_by_mask(uint32_t mask, double x, double y) {
  const uint64_t wide = static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(mask)));
  return bit_cast<double>((bit_cast<uint64_t>(x) & wide) | (bit_cast<uint64_t>(y) & ~wide));
}

// bfloat16 and float32, as c10::BFloat16 converts them (round to nearest even; every NaN becomes
// 0x7fc0), spelled in bit operations the compilers vectorize.
FUSEDLR_HD float float_of_bfloat16(c10::BFloat16 x) { return float_of_bits(static_cast<uint32_t>(x.x) << 16); }

FUSEDLR_HD uint32_t bfloat16_bits_nearest(uint32_t b) { return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16; }

FUSEDLR_HD c10::BFloat16 bfloat16_nearest(float x) {
  const uint32_t bits = x == x ? bfloat16_bits_nearest(float_bits(x)) : 0x7fc0u;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

// The bfloat16 of x rounded stochastically with 16 random bits (the low half of `bits`): adding
// them to x's low half carries into the top half with probability low / 2^16. At or beyond the
// largest finite bfloat16 (and for infinities) as to nearest; NaN as c10 makes it.
FUSEDLR_HD c10::BFloat16 bfloat16_stochastic(float x, uint32_t bits) {
  const uint32_t b = float_bits(x);
  const bool beyond = (b & 0x7fffffffu) >= 0x7f7f0000u;  // NaN included
  const uint32_t nearest = x == x ? bfloat16_bits_nearest(b) : 0x7fc0u;
  const uint32_t out = beyond ? nearest : (b + (bits & 0xffffu)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(out), c10::BFloat16::from_bits());
}

// float16 and float32 as c10::Half converts them on the CPU, by c10's own formulas (its software
// conversion, which c10 compiles where F16C is not assumed, as here), but with the choice between
// candidates made by a mask in arithmetic. c10 chooses by a conditional expression, and gcc moves
// the candidate's floating-point operations into that choice's arms and leaves a branch wherever
// the target has no masked operations: the AVX2 and baseline loops of every float16 step stayed
// scalar, 5 to 9 times slower (AVX2). Both agree with c10's bit for bit on every float16 and every
// float32, NaNs included (checked exhaustively); on the CPU a float16 NaN becomes a quiet float32
// NaN with its payload (a GPU's product makes its canonical NaN), and every float32 NaN becomes
// the float16 0x7e00 with its sign, on the GPU too (where this formula runs as well, in place of
// the hardware conversion, which makes another NaN).
FUSEDLR_HD float float_of_half(c10::Half h) {
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t two_w = w + w;  // the magnitude, at the top
  // normal, infinite and NaN: the exponent rebiased by the product with 2^-112; subnormal and
  // zero: the mantissa as the low bits of 0.5's, less 0.5 (exact)
  const float normal = float_of_bits((two_w >> 4) + (0xe0u << 23)) * 0x1p-112f;
  const float subnormal = float_of_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = float_bits(select_by_mask(mask_at_least(h.x & 0x7fffu, 0x0400u), normal, subnormal));
  return float_of_bits((w & 0x80000000u) | magnitude);
}

FUSEDLR_HD c10::Half half_nearest(float x) {
  const uint32_t w = float_bits(x);
  const uint32_t magnitude = w & 0x7fffffffu;
  // the magnitude times 4 (infinity from 2^16 on), plus 2^15 times x's power of two (at least
  // 2^-14's): the sum's ulp is 4 times x's float16 ulp, so the addition rounds x to nearest even as
  // a float16, and the sum's low bits are that float16's exponent (modulo 32) and mantissa
  const float scaled = (float_of_bits(magnitude) * 0x1p+112f) * 0x1p-110f;
  const uint32_t top = (magnitude << 1) & 0xff000000u;
  const uint32_t bias = top < 0x71000000u ? 0x71000000u : top;
  const uint32_t sum = float_bits(float_of_bits((bias >> 1) + 0x07800000u) + scaled);
  const uint32_t finite = ((sum >> 13) & 0x7c00u) + (sum & 0x0fffu);
  const uint32_t bits = ((w >> 16) & 0x8000u) | select_bits(mask_at_least(magnitude, 0x7f800001u), 0x7e00u, finite);
  return c10::Half(static_cast<uint16_t>(bits), c10::Half::from_bits());
}

// The float16 of x rounded stochastically: in float16's normal range by the float32 bits it drops
// (13), in its subnormal range (steps of 2^-24) by the fraction of a step its magnitude is past
// the step below, against 23 random bits (so P(up) is that fraction rounded up to a multiple of
// 2^-23: a bias below 2^-47 in absolute value, for magnitudes under 2^-14 only); at or beyond the
// largest finite float16, and for NaN, as to nearest. Each candidate is exact in float16 and is
// spelled in its float16 bits, without floorf or a conversion, and chosen by masks made in
// arithmetic: so the loops vectorize (spelled with floorf and conversions, the loops did not, and
// a float16 AdamW step with stochastic rounding took 11x its time). The sign is kept (a negative
// value may round to -0).
FUSEDLR_HD c10::Half half_stochastic(float x, uint32_t bits) {
  const uint32_t b = float_bits(x);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t magnitude_bits = b & 0x7fffffffu;
  // normal: the magnitude with its 13 low bits carried away or not, its exponent rebiased from
  // float32's 127 to float16's 15
  const uint32_t normal = (((magnitude_bits + (bits & 0x1fffu)) >> 13) - ((127u - 15u) << 10)) | sign;
  // subnormal: the count of 2^-24 steps below the magnitude, plus one with probability the
  // fraction of a step; at most 2^10 (2^-14, float16's smallest normal: 0x0400, its count). The
  // magnitude in steps is exact; magnitudes from 2^-13 (0x39000000: 2^11 steps), which this
  // candidate is not for, infinities and NaN included, are clamped there first, so that the
  // conversion to an integer is always defined.
  const uint32_t clamped_bits = magnitude_bits < 0x39000000u ? magnitude_bits : 0x39000000u;
  const float steps = float_of_bits(clamped_bits) * 16777216.0f;
  const int32_t whole = static_cast<int32_t>(steps);  // its floor
  // the fraction and the random fraction u, both in [0, 1), compared as bits: up where fraction > u
  const uint32_t fraction_bits = float_bits(steps - static_cast<float>(whole));
  const uint32_t u_bits = float_bits(static_cast<float>(bits >> 9) * (1.0f / 8388608.0f));  // 23 bits
  const uint32_t up = mask_at_least(fraction_bits, u_bits + 1u) & 1u;
  const uint32_t subnormal = (static_cast<uint32_t>(whole) + up) | sign;
  // normal from 2^-14 (bits 0x38800000); the largest finite float16, 65504, is 0x477fe000
  const uint32_t out = select_bits(mask_at_least(magnitude_bits, 0x38800000u), normal, subnormal);
  const uint32_t in_range = ~mask_at_least(magnitude_bits, 0x477fe000u);
  return c10::Half(static_cast<uint16_t>(select_bits(in_range, out, half_nearest(x).x)), c10::Half::from_bits());
}

// A value of a stored type in the math type, and back to nearest.
template <typename Math, typename T>
FUSEDLR_HD Math math_of(T value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return float_of_bfloat16(value);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<Math>(float_of_half(value));
  } else {
    return static_cast<Math>(value);
  }
}

template <typename T, typename Math>
FUSEDLR_HD T nearest_of(Math value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bfloat16_nearest(value);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return half_nearest(value);
  } else {
    return static_cast<T>(value);
  }
}

// [note: remainders] A float32 as its bfloat16 top half rounded to nearest, ties away from zero,
// and the int16 remainder.
struct MasterHalves {
  uint16_t param;
  int16_t remainder;
};

FUSEDLR_HD MasterHalves split_master(float master) {
  const uint32_t b = float_bits(master);
  // The magnitude's half carried into the top half: ties away. The rounding leaves the low half
  // zero, so the remainder (the float32 less the rounding, as a count of low-half units, in
  // [-2^15, 2^15)) has the float32's own low half for its 16 bits. A NaN, whose carry could reach
  // its exponent or sign, keeps its sign and top half, made quiet, and a zero remainder: it joins
  // to a NaN again.
  const bool is_nan = !(master == master);
  const uint32_t top = is_nan ? (b >> 16) | 0x0040u : (b + 0x8000u) >> 16;
  const uint32_t remainder = is_nan ? 0u : b;
  return {static_cast<uint16_t>(top), static_cast<int16_t>(static_cast<uint16_t>(remainder))};
}

FUSEDLR_HD float join_master(uint16_t param, int16_t remainder) {
  return float_of_bits((static_cast<uint32_t>(param) << 16) + static_cast<uint32_t>(static_cast<int32_t>(remainder)));
}

// ---------------------------------------------------------------------------------------------
// [note: 8-bit state]
// State kept in 8 bits per value is a float8 e4m3 code (OCP's e4m3fn: a sign, 4 exponent bits of
// bias 7, 3 mantissa bits; no infinities, 0x7f and 0xff are NaN; the largest finite is 448) times
// a power of two that a block of kMxBlock consecutive elements shares (OCP's MX scaling, a byte of
// exponent, E8M0). A block's scale is 2^(e - 8), where e is the exponent of the largest finite
// magnitude in it (1 at least: the scale is a normal float32), so that the largest value divided
// by the scale lies in [256, 512). Each value is divided by the scale (exactly: a power of two)
// and rounded to the nearest e4m3, ties to even, its magnitude clamped at 448 first (so a value
// within 1/8 of the next power of two loses up to an eighth); NaN and infinities become NaN (e4m3
// has no infinity), and do not enter the block's largest magnitude. Decoding multiplies exactly.
// A decoded block encodes to the same codes and scale: its largest value decodes into [256, 448]
// times the scale, of the same exponent. So state saved decoded (as float32) loads back bit for
// bit. benchmarks/moment_formats.py compares this format with others on AdamW's moments.
//
// A tensor of n values keeps its codes, then its ceil(n / kMxBlock) scale bytes, in one uint8
// tensor (mx_bytes): the blocks run over the tensor's elements in memory order.
//
// With state_dtype=torch.float8_e4m3fn every state list of a parameter is so kept (Storage's
// state_t is then Mx8State). A step takes a block at a time: it decodes the block's states into
// float32, updates each element as with float32 state (the same update, the same bits), and
// encodes each state anew with the scale of its new largest magnitude (mx_encode_block), rounded
// to nearest or, with stochastic rounding, with 20 of the 32 bits of stream mx_state_stream(list)
// per value. So a step with 8-bit state is the float32-state step from the decoded state,
// followed by an encoding; the CPU loops and the CUDA kernels (one thread per block) share every
// function of it. The state_dict shows the decoded values (float32, shaped like the parameter),
// and load_state_dict encodes what it loads to nearest: a saved state loads back bit for bit
// into parameters laid out and sharded as they were (fresh state holds zeros as encoded, its
// scale bytes 1: fusedlr/_state.py, mx_zeros_).
inline constexpr int64_t kMxBlock = 32;

FUSEDLR_HD constexpr int64_t mx_blocks(int64_t numel) { return (numel + kMxBlock - 1) / kMxBlock; }
FUSEDLR_HD constexpr int64_t mx_bytes(int64_t numel) { return numel + mx_blocks(numel); }

// The magnitude of x as bits where x is finite, else 0: what a block's largest magnitude is the
// maximum of (as unsigned integers, which order non-negative floats as they are).
FUSEDLR_HD uint32_t finite_magnitude_bits(float x) {
  const uint32_t magnitude = float_bits(x) & 0x7fffffffu;
  return select_bits(mask_at_least(magnitude, 0x7f800000u), 0u, magnitude);
}

// The scale byte of a block whose largest finite magnitude has the bits `largest`: its biased
// exponent less 8, at least 1.
FUSEDLR_HD uint8_t mx_scale_byte(uint32_t largest) {
  const uint32_t exponent = largest >> 23;
  return static_cast<uint8_t>(select_bits(mask_at_least(exponent, 9u), exponent - 8u, 1u));
}

// The bits of min(scaled, 448) for a scaled magnitude (non-negative, or NaN: 448), by an integer
// minimum: non-negative floats order as their bits. The encoders' arithmetic after the clamp then
// is unconditional, which the compilers vectorize for AVX2 too (a conditional float product, which
// may raise a floating-point exception, they would keep in a branch where AVX-512 masks it).
FUSEDLR_HD uint32_t mx_clamped_bits(float scaled) {
  const uint32_t bits = float_bits(scaled);
  constexpr uint32_t kLargest = 0x43e00000u;  // 448.0f, the largest e4m3
  return bits < kLargest ? bits : kLargest;
}

// The e4m3 code of x divided by the scale of byte `scale`, rounded to nearest even.
FUSEDLR_HD uint8_t mx_encode(float x, uint8_t scale) {
  const uint32_t b = float_bits(x);
  const uint32_t sign = (b >> 24) & 0x80u;
  const float scaled = float_of_bits(b & 0x7fffffffu) * float_of_bits((254u - scale) << 23);  // |x| / 2^(scale-127)
  const uint32_t c = mx_clamped_bits(scaled);  // NaN: 448, replaced below
  const float clamped = float_of_bits(c);
  // normal e4m3 (from 2^-6): the float32's exponent and top 3 mantissa bits, rounded to nearest
  // even, the exponent rebiased from 127 to 7
  const uint32_t normal = ((c + 0x7ffffu + ((c >> 20) & 1u)) >> 20) - ((127u - 7u) << 3);
  // subnormal e4m3 (steps of 2^-9): the count of steps, rounded to nearest even by an addition
  // at 2^23, where a float32's steps are 1
  const uint32_t subnormal = float_bits(clamped * 512.0f + 8388608.0f) - 0x4b000000u;
  const uint32_t magnitude = select_bits(mask_at_least(c, 0x3c800000u), normal, subnormal);
  const uint32_t finite = mask_at_least(0x7f7fffffu, b & 0x7fffffffu);
  return static_cast<uint8_t>(sign | select_bits(finite, magnitude, 0x7fu));
}

// The e4m3 code of x divided by the scale of byte `scale`, rounded stochastically with 20 random
// bits (the low 20 of `bits`): a normal e4m3 by the 20 float32 mantissa bits it drops, which the
// random bits carry into the kept ones with probability their fraction of a step (exactly); a
// subnormal e4m3 (steps of 2^-9) by the value in steps with 20 bits of fraction, so that P(up) is
// the fraction of a step rounded down to a multiple of 2^-20. The magnitude is clamped at 448
// first, which is an e4m3 (so it never rounds past it); NaN and infinities become NaN.
FUSEDLR_HD uint8_t mx_encode_stochastic(float x, uint8_t scale, uint32_t bits) {
  const uint32_t b = float_bits(x);
  const uint32_t sign = (b >> 24) & 0x80u;
  const float scaled = float_of_bits(b & 0x7fffffffu) * float_of_bits((254u - scale) << 23);
  const uint32_t c = mx_clamped_bits(scaled);
  const float clamped = float_of_bits(c);
  const uint32_t random = bits & 0xfffffu;
  const uint32_t normal = ((c + random) >> 20) - ((127u - 7u) << 3);
  // below 2^-6 the value is under 8 steps: in steps times 2^20 it is below 2^23, an exact integer
  // part of a float32 product, truncated by the conversion (NaN and larger values are clamped
  // first, so that the conversion is defined)
  const float fixed = select_by_mask(mask_at_least(0x3c7fffffu, c), clamped, 0.0f) * 536870912.0f;  // 2^9 steps, 2^20
  const uint32_t subnormal = (static_cast<uint32_t>(static_cast<int32_t>(fixed)) + random) >> 20;
  const uint32_t magnitude = select_bits(mask_at_least(c, 0x3c800000u), normal, subnormal);
  const uint32_t finite = mask_at_least(0x7f7fffffu, b & 0x7fffffffu);
  return static_cast<uint8_t>(sign | select_bits(finite, magnitude, 0x7fu));
}

// The value of e4m3 code `code` times the scale of byte `scale` (exact).
FUSEDLR_HD float mx_decode(uint8_t code, uint8_t scale) {
  const uint32_t magnitude = code & 0x7fu;
  const float normal = float_of_bits((magnitude << 20) + ((127u - 7u) << 23));
  const float subnormal = static_cast<float>(magnitude) * 0x1p-9f;
  const float value = select_by_mask(mask_at_least(magnitude, 8u), normal, subnormal);
  const float nan_or_value = select_by_mask(mask_at_least(magnitude, 0x7fu), float_of_bits(0x7fc00000u), value);
  const float scaled = nan_or_value * float_of_bits(static_cast<uint32_t>(scale) << 23);  // times 2^(scale-127)
  return float_of_bits(float_bits(scaled) | ((static_cast<uint32_t>(code) & 0x80u) << 24));
}

// The scale byte of the n values of a block (their largest finite magnitude's), and its codes.
// With kStochastic, value j rounds with the bits random(j) (mx_encode_stochastic), else to nearest.
// The CPU loops and the CUDA kernels encode every block of state through this one function.
FUSEDLR_HD uint8_t mx_block_scale(const float* values, int n) {
  uint32_t largest = 0;
  for (int j = 0; j < n; ++j) {
    const uint32_t magnitude = finite_magnitude_bits(values[j]);
    largest = magnitude > largest ? magnitude : largest;
  }
  return mx_scale_byte(largest);
}

template <bool kStochastic, typename Random>
FUSEDLR_HD uint8_t mx_encode_block(const float* values, int n, uint8_t* codes, const Random& random) {
  const uint8_t scale = mx_block_scale(values, n);
  for (int j = 0; j < n; ++j) {
    if constexpr (kStochastic) {
      codes[j] = mx_encode_stochastic(values[j], scale, random(j));
    } else {
      codes[j] = mx_encode(values[j], scale);
    }
  }
  return scale;
}

// 8-bit state as a type of the element loops (Storage's state_t): the loops update each block in
// float32 and encode it whole, so no element is ever stored alone.
struct Mx8State {};

// ---------------------------------------------------------------------------------------------
// A tensor's storage ([note: storage]), a template argument of the element loops

enum class MasterKind : uint8_t { kNone, kFloat, kRemainder };

template <typename T>
inline constexpr bool kIsLowPrecision = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

template <typename Param, typename Math, typename State, MasterKind kMaster, bool kStochastic>
struct Storage {
  using param_t = Param;
  using math_t = Math;
  using state_t = State;
  using master_t = std::conditional_t<kMaster == MasterKind::kRemainder, int16_t, Math>;
  static constexpr MasterKind master = kMaster;
  static constexpr bool kMxState = std::is_same_v<State, Mx8State>;  // [note: 8-bit state]
  static constexpr bool kStochasticParam = kStochastic && kMaster == MasterKind::kNone && kIsLowPrecision<Param>;
  static constexpr bool kStochasticState = kStochastic && (kIsLowPrecision<State> || kMxState);
  // 8-bit state is updated in blocks of float32 values stored as these (update the block, then
  // encode it): the same storage with float32 state
  using BlockStorage = Storage<Param, Math, std::conditional_t<kMxState, Math, State>, kMaster, kStochastic>;
  static_assert(kMaster == MasterKind::kNone || kIsLowPrecision<Param>, "master weights are for low-precision parameters");
  static_assert(kMaster != MasterKind::kRemainder || std::is_same_v<Param, c10::BFloat16>,
                "remainders complete bfloat16 parameters only");
  static_assert(std::is_same_v<State, Math> || std::is_same_v<Math, float>, "bfloat16 state is computed in float32");

  // The value an update starts from; `master` is read only where there is one.
  FUSEDLR_HD static Math param_value(const Param& param, const master_t& master) {
    if constexpr (kMaster == MasterKind::kNone) {
      return math_of<Math>(param);
    } else if constexpr (kMaster == MasterKind::kFloat) {
      return master;
    } else {
      return join_master(param.x, master);
    }
  }

  // Stores an updated value; `bits` are used only when the parameter rounds stochastically.
  FUSEDLR_HD static void set_param(Param& param, master_t& master, Math value, uint32_t bits) {
    if constexpr (kMaster == MasterKind::kRemainder) {
      const MasterHalves halves = split_master(value);
      param = Param(halves.param, Param::from_bits());
      master = halves.remainder;
    } else if constexpr (kMaster == MasterKind::kFloat) {
      master = value;
      if constexpr (std::is_same_v<Param, c10::BFloat16>) {
        param = Param(split_master(value).param, Param::from_bits());  // [note: remainders]
      } else {
        param = nearest_of<Param>(value);
      }
    } else if constexpr (kStochasticParam) {
      if constexpr (std::is_same_v<Param, c10::BFloat16>) {
        param = bfloat16_stochastic(value, bits);
      } else {
        param = half_stochastic(value, bits);
      }
    } else {
      param = nearest_of<Param>(value);
    }
  }

  FUSEDLR_HD static Math state_value(const State& state) { return math_of<Math>(state); }

  FUSEDLR_HD static void set_state(State& state, Math value, uint32_t bits) {
    if constexpr (kStochasticState) {
      state = bfloat16_stochastic(value, bits);
    } else {
      state = nearest_of<State>(value);
    }
  }
};

// 8-bit state rounds with 20 random bits per value: list k takes all 32 bits of stream 1 + k (a
// tensor's state is either bfloat16 or 8-bit, so the two never share a stream).
FUSEDLR_HD constexpr int mx_state_stream(int list) { return 1 + list; }

// The keys of a tensor's random bits at one step: the parameter's, then one per state list (pairs
// of bfloat16 lists share one, state_stream; each 8-bit list has its own, mx_state_stream).
template <int kStates>
struct RoundingKeys {
  static constexpr int kStreams = 1 + kStates;
  uint64_t key[kStreams];

  FUSEDLR_HD static RoundingKeys of(uint64_t seed, int64_t tensor, int64_t step) {
    RoundingKeys keys;
    for (int s = 0; s < kStreams; ++s) keys.key[s] = rounding_key(seed, tensor, step, s);
    return keys;
  }
};

}  // namespace fusedlr
