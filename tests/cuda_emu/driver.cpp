#include <chrono>
// A stand-in for libcuda.so.1, for testing only: the part of the CUDA driver API that the wgpt
// CUDA backend (through cudarc) calls, on host memory, launching the kernels of cuda/*.cu
// compiled for the host with shim.h. Device pointers are host pointers. Launches run at once
// (a stream is trivially in order). Each block runs on one worker OS thread as blockDim fibers;
// blocks are spread over the host's cores; between barriers a block's threads run one after the
// other (forwards or backwards, alternating between blocks and launches). It checks what a GPU would not forgive: launch limits,
// dynamic shared memory above the opt-in, copies outside an allocation, double frees, barriers
// not reached by every live thread of a block (deadlock), full-mask shuffles with exited lanes.
// Fresh device memory and dynamic shared memory are filled with NaNs, so reading either before
// writing it shows up in the results.
#include <ucontext.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "shim.h"

// ------------------------------------------------------------------ fibers

static const size_t STACK = 128 * 1024;
static const size_t SMEM_FLOATS = 166912 / 4;  // the opt-in maximum the stand-in GPU reports
thread_local dim3 blockIdx, blockDim, gridDim;
alignas(16) thread_local float smem[SMEM_FLOATS];

enum State { RUN, AT_BLOCK, AT_WARP, DONE };
struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    int lin;
    State state;
    unsigned warp_mask;  // the mask of the shuffle it waits in
};
struct Worker {
    ucontext_t sched;
    std::vector<Fiber> fibers;
    std::vector<std::unique_ptr<char[]>> stacks;
    std::vector<float> slot;  // shuffle exchange, one per thread
    Fiber* cur = nullptr;
    void (*launch)(void*, void**) = nullptr;
    void* fn = nullptr;
    void** params = nullptr;
    const char* name = "";
    unsigned parity = 0;  // the launch's number, mod 2
};
static thread_local Worker W;
static std::mutex g_err_mu;
static std::string g_err;  // first fatal error of the current launch
static std::atomic<bool> g_failed{false};

static void fail(const std::string& msg) {
    std::lock_guard<std::mutex> g(g_err_mu);
    if (!g_failed.exchange(true)) g_err = msg;
}

const dim3& emu_thread_idx() { return W.cur->tid; }

static void yield_as(State s) {
    Fiber* f = W.cur;
    f->state = s;
    swapcontext(&f->ctx, &W.sched);
}

void emu_syncthreads() { yield_as(AT_BLOCK); }

static float exchange(float v, int src, unsigned mask) {
    Fiber* f = W.cur;
    int base = f->lin & ~31;
    W.slot[f->lin] = v;
    f->warp_mask = mask;
    yield_as(AT_WARP);
    float r = W.slot[base + (src & 31)];
    yield_as(AT_WARP);
    return r;
}
float emu_shfl(float v, int lane, unsigned mask) { return exchange(v, lane, mask); }
float emu_shfl_xor(float v, int m, unsigned mask) { return exchange(v, (W.cur->lin & 31) ^ m, mask); }

static std::mutex g_atomic;
void emu_atomic_lock() { g_atomic.lock(); }
void emu_atomic_unlock() { g_atomic.unlock(); }

static void fiber_main() {
    W.launch(W.fn, W.params);
    W.cur->state = DONE;
    swapcontext(&W.cur->ctx, &W.sched);
}

static char hex(unsigned v) { return "0123456789abcdef"[v & 15]; }

// Run one block to completion on this OS thread; false (with g_err set) on a synchronisation error.
static bool run_block(dim3 b, unsigned nt) {
    if (W.stacks.size() < nt) {
        while (W.stacks.size() < nt) W.stacks.emplace_back(new char[STACK]);
    }
    W.fibers.resize(nt);
    W.slot.assign(nt, 0.0f);
    blockIdx = b;
    for (unsigned t = 0; t < nt; t++) {
        Fiber& f = W.fibers[t];
        f.tid = dim3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
        f.lin = (int)t;
        f.state = RUN;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = W.stacks[t].get();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
    }
    unsigned nwarps = (nt + 31) / 32;
    // Between barriers the fibers run one after another, in thread order or in reverse, alternating
    // between neighbouring blocks and between launches: a missing barrier shows up whichever
    // thread reads the other's write.
    bool reverse = (((b.z * gridDim.y + b.y) * gridDim.x + b.x) + W.parity) % 2 == 1;
    for (;;) {
        for (unsigned i = 0; i < nt; i++) {
            Fiber& f = W.fibers[reverse ? nt - 1 - i : i];
            if (f.state != RUN) continue;
            W.cur = &f;
            swapcontext(&W.sched, &f.ctx);
        }
        // every fiber now waits at a barrier or has returned
        bool released = false, all_done = true, all_at_block_or_done = true;
        for (unsigned w = 0; w < nwarps; w++) {
            unsigned lo = w * 32, hi = std::min(nt, lo + 32);
            bool any_waiting = false, ok = true, any_done = false;
            unsigned mask = 0;
            for (unsigned t = lo; t < hi; t++) {
                State s = W.fibers[t].state;
                if (s == AT_WARP) any_waiting = true, mask = W.fibers[t].warp_mask;
                else if (s == DONE) any_done = true;
                else ok = false;
            }
            if (any_waiting && ok) {
                if (any_done && mask == 0xffffffffu) {
                    char buf[160];
                    snprintf(buf, sizeof buf, "%s: full-mask warp shuffle in block (%u,%u,%u) warp %u after some of its lanes returned",
                             W.name, b.x, b.y, b.z, w);
                    fail(buf);
                    return false;
                }
                for (unsigned t = lo; t < hi; t++)
                    if (W.fibers[t].state == AT_WARP) W.fibers[t].state = RUN;
                released = true;
            }
        }
        for (unsigned t = 0; t < nt; t++) {
            State s = W.fibers[t].state;
            if (s != DONE) all_done = false;
            if (s != DONE && s != AT_BLOCK) all_at_block_or_done = false;
        }
        if (all_done) return true;
        if (released) continue;
        if (all_at_block_or_done) {
            for (unsigned t = 0; t < nt; t++)
                if (W.fibers[t].state == AT_BLOCK) W.fibers[t].state = RUN;
            continue;
        }
        char buf[200];
        snprintf(buf, sizeof buf, "%s: deadlock in block (%u,%u,%u): threads wait at different barriers (__syncthreads vs a warp shuffle)",
                 W.name, b.x, b.y, b.z);
        fail(buf);
        return false;
    }
}

// ------------------------------------------------------------------ kernel registry

struct Fn {
    void* fn;
    EmuLauncher launch;
    int max_dyn_smem;
    std::string name;
};
static std::map<std::string, Fn*>& registry() {
    static std::map<std::string, Fn*> r;
    return r;
}
void emu_register(const char* name, void* fn, EmuLauncher l) { registry()[name] = new Fn{fn, l, 48 * 1024, name}; }

// ------------------------------------------------------------------ the driver API

static int env_int(const char* k, int dflt) {
    const char* v = getenv(k);
    return v && *v ? atoi(v) : dflt;
}
static std::mutex g_mu;
static std::map<uint64_t, size_t> g_allocs;
// what the host asked for, for tests of "no host wait between kernels" (wgpt_emu_counters)
static std::atomic<long long> g_launches{0}, g_syncs{0}, g_dtoh{0};

static void die(const char* what) {
    fprintf(stderr, "cuda-emu: %s\n", what);
    abort();
}
static void check_range(uint64_t p, size_t n, const char* what) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) die(what);
    --it;
    if (p < it->first || p + n > it->first + it->second) die(what);
}

#pragma GCC visibility push(default)
extern "C" {
typedef int CUresult;
typedef uint64_t CUdeviceptr;
enum { OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_IMAGE = 200, INVALID_DEVICE = 101, NOT_FOUND = 500, LAUNCH_FAILED = 719 };

CUresult cuInit(unsigned) { return OK; }
CUresult cuGetExportTable(const void** t, const void*) {
    *t = nullptr;
    return NOT_FOUND;
}
CUresult cuDriverGetVersion(int* v) {
    *v = env_int("WGPT_CUDA_EMU_DRIVER", 12040);
    return OK;
}
CUresult cuDeviceGetCount(int* c) {
    *c = 1;
    return OK;
}
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* n, int len, int) {
    snprintf(n, len, "wgpt CUDA emulator on the CPU (sm_%d)", env_int("WGPT_CUDA_EMU_CC", 70));
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    int cc = env_int("WGPT_CUDA_EMU_CC", 70);
    switch (attr) {
        case 75: *v = cc / 10; break;      // compute capability major
        case 76: *v = cc % 10; break;      // minor
        case 97: *v = 166912; break;       // max shared memory per block (opt-in)
        case 8: *v = 49152; break;         // max shared memory per block
        case 16: *v = 80; break;           // multiprocessors
        case 1: *v = 1024; break;          // max threads per block
        default: *v = 0;
    }
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* b, int) {
    *b = (size_t)env_int("WGPT_CUDA_EMU_MEM_MIB", 8192) << 20;
    return OK;
}
static int g_ctx_obj;
static thread_local void* t_ctx = nullptr;
CUresult cuDevicePrimaryCtxRetain(void** c, int) {
    *c = &g_ctx_obj;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxGetCurrent(void** c) {
    *c = t_ctx;
    return OK;
}
CUresult cuCtxSetCurrent(void* c) {
    t_ctx = c;
    return OK;
}
CUresult cuCtxSynchronize() {
    g_syncs++;
    return OK;
}
static int g_stream_obj;
CUresult cuStreamCreate(void** s, unsigned) {
    *s = &g_stream_obj;
    return OK;
}
CUresult cuStreamDestroy_v2(void*) { return OK; }
CUresult cuStreamSynchronize(void*) {
    g_syncs++;
    return OK;
}
// events: launches run to completion when called, so an event records the host clock then
CUresult cuEventCreate(void** e, unsigned) {
    *e = new double(0.0);
    return OK;
}
CUresult cuEventRecord(void* e, void*) {
    *(double*)e = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
    return OK;
}
CUresult cuEventSynchronize(void*) { return OK; }
CUresult cuEventQuery(void*) { return OK; }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = (float)(*(double*)b - *(double*)a);
    return OK;
}
CUresult cuEventDestroy_v2(void* e) {
    delete (double*)e;
    return OK;
}
static size_t g_used = 0;
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    std::lock_guard<std::mutex> g(g_mu);
    size_t t = (size_t)env_int("WGPT_CUDA_EMU_MEM_MIB", 8192) << 20;
    *total = t;
    *free_b = g_used < t ? t - g_used : 0;
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    size_t t = (size_t)env_int("WGPT_CUDA_EMU_MEM_MIB", 8192) << 20;
    std::lock_guard<std::mutex> g(g_mu);
    if (n == 0) return INVALID_VALUE;
    if (g_used + n > t) return OUT_OF_MEMORY;
    void* m = aligned_alloc(256, (n + 255) / 256 * 256);
    if (!m) return OUT_OF_MEMORY;
    memset(m, 0xff, n);  // NaN
    *p = (CUdeviceptr)m;
    g_allocs[*p] = n;
    g_used += n;
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_allocs.find(p);
    if (it == g_allocs.end()) die("cuMemFree of a pointer that is not an allocation");
    g_used -= it->second;
    g_allocs.erase(it);
    free((void*)p);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char c, size_t n, void*) {
    check_range(p, n, "cuMemsetD8Async outside an allocation");
    memset((void*)p, c, n);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) {
    check_range(d, n, "cuMemcpyHtoDAsync outside an allocation");
    memcpy((void*)d, s, n);
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) {
    check_range(s, n, "cuMemcpyDtoHAsync outside an allocation");
    g_dtoh++;
    memcpy(d, (void*)s, n);
    return OK;
}
// A loaded module: the precision its source was compiled in (cuda/common.cuh names it in the
// image as the symbol wgpt_floatx_<p>), which picks the host build of each kernel.
struct EmuModule {
    std::string precision;
};
CUresult cuModuleLoadData(void** m, const void* img) {
    const unsigned char* b = (const unsigned char*)img;
    // what NVRTC made for this "device": a CUBIN (ELF) or PTX text
    bool elf = b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F';
    bool ptx = strstr((const char*)img, ".target") != nullptr && !elf;
    if (!elf && !ptx) return INVALID_IMAGE;
    size_t size = 0;
    if (elf) {  // ELF64: the image ends with the section (or program) header table
        uint64_t shoff, phoff;
        uint16_t phentsize, phnum, shentsize, shnum;
        memcpy(&phoff, b + 0x20, 8);
        memcpy(&shoff, b + 0x28, 8);
        memcpy(&phentsize, b + 0x36, 2);
        memcpy(&phnum, b + 0x38, 2);
        memcpy(&shentsize, b + 0x3a, 2);
        memcpy(&shnum, b + 0x3c, 2);
        size = std::max<uint64_t>(shoff + (uint64_t)shentsize * shnum, phoff + (uint64_t)phentsize * phnum);
    } else {
        size = strlen((const char*)img);
    }
    const char key[] = "wgpt_floatx_";
    const unsigned char* hit = (const unsigned char*)memmem(b, size, key, sizeof key - 1);
    if (!hit) {
        fprintf(stderr, "cuda-emu: a module without its precision marker (wgpt_floatx_*)\n");
        return INVALID_IMAGE;
    }
    std::string prec;
    for (const unsigned char* c = hit + sizeof key - 1; c < b + size && ((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9')); c++) prec += (char)*c;
    *m = new EmuModule{prec};
    return OK;
}
CUresult cuModuleUnload(void* m) {
    delete (EmuModule*)m;
    return OK;
}
CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
    auto it = registry().find(std::string(name) + "@" + ((EmuModule*)m)->precision);
    if (it == registry().end()) return NOT_FOUND;
    *f = it->second;
    return OK;
}
CUresult cuFuncSetAttribute(void* f, int attr, int v) {
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (v < 0 || v > 166912) return INVALID_VALUE;
        ((Fn*)f)->max_dyn_smem = v;
    }
    return OK;
}
CUresult cuGetErrorString(CUresult r, const char** s) {
    *s = r == LAUNCH_FAILED ? "cuda-emu: the kernel failed (see stderr)" : "cuda-emu error";
    return OK;
}
CUresult cuGetErrorName(CUresult r, const char** s) {
    *s = r == LAUNCH_FAILED ? "CUDA_ERROR_LAUNCH_FAILED" : r == OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_EMU";
    return OK;
}

// not CUDA: the counts of kernel launches, stream/context synchronisations and device→host copies
void wgpt_emu_counters(long long out[3]) {
    out[0] = g_launches;
    out[1] = g_syncs;
    out[2] = g_dtoh;
}

CUresult cuLaunchKernel(void* fp, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shm, void*, void** params, void** extra) {
    Fn* f = (Fn*)fp;
    unsigned nt = bx * by * bz;
    if (extra) die("cuLaunchKernel: `extra` is not supported");
    if (nt == 0 || nt > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) {
        fprintf(stderr, "cuda-emu: %s: bad launch dimensions grid (%u,%u,%u) block (%u,%u,%u)\n", f->name.c_str(), gx, gy, gz, bx, by, bz);
        return INVALID_VALUE;
    }
    if ((int)shm > f->max_dyn_smem) {
        fprintf(stderr, "cuda-emu: %s: %u B dynamic shared memory but the function allows %d (cuFuncSetAttribute)\n",
                f->name.c_str(), shm, f->max_dyn_smem);
        return INVALID_VALUE;
    }
    g_launches++;
    g_failed = false;
    unsigned long long nblocks = (unsigned long long)gx * gy * gz;
    std::atomic<unsigned long long> next{0};
    auto work = [&]() {
        W.launch = f->launch;
        W.fn = f->fn;
        W.params = params;
        W.name = f->name.c_str();
        W.parity = (unsigned)(g_launches % 2);
        blockDim = dim3{bx, by, bz};
        gridDim = dim3{gx, gy, gz};
        for (;;) {
            unsigned long long i = next++;
            if (i >= nblocks || g_failed) break;
            memset(smem, 0xff, shm);  // uninitialised shared memory reads as NaN
            dim3 b{(unsigned)(i % gx), (unsigned)((i / gx) % gy), (unsigned)(i / ((unsigned long long)gx * gy))};
            if (!run_block(b, nt)) break;
        }
    };
    unsigned nw = std::max(1u, std::min<unsigned>(std::thread::hardware_concurrency(), (unsigned)std::min<unsigned long long>(nblocks, 64)));
    std::vector<std::thread> th;
    for (unsigned i = 1; i < nw; i++) th.emplace_back(work);
    work();
    for (auto& t : th) t.join();
    if (g_failed) {
        fprintf(stderr, "cuda-emu: %s\n", g_err.c_str());
        return LAUNCH_FAILED;
    }
    return OK;
}
}
#pragma GCC visibility pop
