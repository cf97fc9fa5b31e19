// common.cuh: prepended to every cuda/*.cu (src/backend/cuda/compile.rs for NVRTC, and the CUDA
// emulator for the host). It defines `floatX`, the storage type of a launch's float arrays
// (activations, parameters, gradients: the graph's `Class::Float` views), chosen per compilation:
// -DFLOATX_F16 (IEEE binary16), -DFLOATX_BF16 (bfloat16), else f32. Statistics, losses, scalars,
// master weights, AdamW moments and scratch stay `float` in every precision.
// A kernel reads with load(p, i) (exact conversion to f32), computes in f32, and writes with
// store(p, i, v) (one rounding to nearest even), which is what the cpu reference does.
// 16-bit values are their bits in a one-field struct, converted with plain integer and float
// arithmetic: no cuda_fp16.h and no PTX, so NVRTC and the emulator compile the same code.

struct half_t { unsigned short bits; };  // IEEE binary16
struct bf16_t { unsigned short bits; };  // bfloat16 (the top half of an f32)

// f16 bits to f32, exact for every value (normals, subnormals, ±0, ±inf, NaN): exponent and
// mantissa shifted into place, then ×2^112 rebiases the exponent (15 → 127; a subnormal f16
// becomes a normal f32, exact since NVRTC keeps f32 denormals without --use_fast_math);
// exponent 31 (inf/NaN) is set to 255.
__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    unsigned int bits = (unsigned int)(h & 0x7fffu) << 13;
    float mag = __int_as_float((int)bits) * 0x1p112f;
    if ((h & 0x7c00u) == 0x7c00u) mag = __int_as_float((int)(bits | 0x7f800000u));
    return __int_as_float(__float_as_int(mag) | (int)((unsigned int)(h & 0x8000u) << 16));
}

// f32 to f16 bits, rounding to nearest even: ≥ 65520 in magnitude is inf, below 2^-14 a
// subnormal (or ±0), NaN stays a (quiet) NaN with its top mantissa bits.
__device__ __forceinline__ unsigned short f32_to_f16_bits(float f) {
    unsigned int x = (unsigned int)__float_as_int(f);
    unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);
    if (ax < 0x38800000u) {  // |f| < 2^-14: f16 subnormal m·2^-24, m = round(|f|·2^24)
        int shift = 126 - (int)(ax >> 23);  // ≥ 14
        if (shift > 24) return (unsigned short)sign;
        unsigned int mant = (ax & 0x7fffffu) | 0x800000u;
        unsigned int r = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (unsigned short)(sign | r);
    }
    unsigned int h = (ax >> 13) - (112u << 10);  // rebias 127 → 15; a carry out of the mantissa is right
    unsigned int rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (unsigned short)(sign | h);
}

// bf16 bits to f32: exact (the bits are the f32's top half)
__device__ __forceinline__ float bf16_bits_to_f32(unsigned short h) { return __int_as_float((int)((unsigned int)h << 16)); }

// f32 to bf16 bits, rounding to nearest even (overflow rounds to inf); NaN stays a quiet NaN
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    unsigned int x = (unsigned int)__float_as_int(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (unsigned short)(x >> 16);
}

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const half_t* p, long long i) { return f16_bits_to_f32(p[i].bits); }
__device__ __forceinline__ float load(const bf16_t* p, long long i) { return bf16_bits_to_f32(p[i].bits); }
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(half_t* p, long long i, float v) { p[i].bits = f32_to_f16_bits(v); }
__device__ __forceinline__ void store(bf16_t* p, long long i, float v) { p[i].bits = f32_to_bf16_bits(v); }

#if defined(FLOATX_F16)
typedef half_t floatX;
#define FLOATX_IS_F32 0
#define FLOATX_MARKER wgpt_floatx_f16
#elif defined(FLOATX_BF16)
typedef bf16_t floatX;
#define FLOATX_IS_F32 0
#define FLOATX_MARKER wgpt_floatx_bf16
#else
typedef float floatX;
#define FLOATX_IS_F32 1
#define FLOATX_MARKER wgpt_floatx_f32
#endif

// The precision, named in the compiled image (a symbol); the CUDA emulator reads it to run the
// matching host build of a module. (The host build defines WGPT_CUDA_EMU and needs no marker.)
#ifndef WGPT_CUDA_EMU
extern "C" __device__ int FLOATX_MARKER = 1;
#endif
