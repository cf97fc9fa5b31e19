// CUDA C on the host, for testing only: just enough of the language that cuda/*.cu use, so
// that the real kernel sources run on the CPU under tests/cuda_emu/driver.cpp (a stand-in for
// libcuda). Every GPU thread of a block is a fiber on one OS thread; __syncthreads and the warp
// shuffles are barriers between fibers. Shared memory is thread_local (one block per OS thread at
// a time). This checks indexing, synchronisation and arithmetic, not speed or the memory model.
#pragma once
// cuda/common.cuh: no precision marker symbol on the host (the build registers kernels by precision)
#define WGPT_CUDA_EMU 1
#include <cmath>
#include <cstring>
#include <cstdint>
#include <algorithm>
#include <utility>
using std::max;
using std::min;
using std::isfinite;  // a CUDA device function; the host has it in std

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
const dim3& emu_thread_idx();
extern thread_local dim3 blockIdx, blockDim, gridDim;
#define threadIdx (emu_thread_idx())

#define __global__
#define __device__ static
#define __forceinline__ inline
#define __shared__ static thread_local
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) float4 {
    float x, y, z, w;
};

void emu_syncthreads();
float emu_shfl(float v, int src_lane, unsigned mask);
float emu_shfl_xor(float v, int lane_mask, unsigned mask);
void emu_atomic_lock();
void emu_atomic_unlock();

#define __syncthreads() emu_syncthreads()
inline float __shfl_sync(unsigned mask, float v, int lane) { return emu_shfl(v, lane, mask); }
inline float __shfl_xor_sync(unsigned mask, float v, int m) { return emu_shfl_xor(v, m, mask); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float atomicAdd(float* p, float v) {
    emu_atomic_lock();
    float o = *p;
    *p = o + v;
    emu_atomic_unlock();
    return o;
}

// registration of each kernel with the stand-in driver (cuModuleGetFunction looks names up here)
typedef void (*EmuLauncher)(void* fn, void** params);
void emu_register(const char* name, void* fn, EmuLauncher launch);
template <class... A>
struct EmuReg {
    template <size_t... I>
    static void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
        f(*(A*)p[I]...);
    }
    static void launch(void* fn, void** p) { call((void (*)(A...))fn, p, std::index_sequence_for<A...>{}); }
};
template <class... A>
void emu_reg(const char* name, void (*f)(A...)) {
    emu_register(name, (void*)f, &EmuReg<A...>::launch);
}
