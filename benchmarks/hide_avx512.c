/*
 * LD_PRELOAD library: a process that sees an AVX2-only x86 CPU on an AVX-512 one.
 *
 * ONNX Runtime's MLAS, NumPy, libgcc (our scan kernel's path choice) and most other libraries pick their code
 * paths from the CPUID instruction.  Linux can make CPUID fault in a process (ARCH_SET_CPUID, on CPUs with
 * CPUID faulting: the "cpuid_fault" flag of /proc/cpuinfo); this library turns that on at load time and answers
 * each CPUID itself, with the AVX-512 family, AVX-VNNI and AMX cleared from leaf 7.  So INT8 models run
 * ONNX Runtime's AVX2 kernels (vpmaddubsw, int16 sums that can saturate) and fp32 its AVX2 ones, natively:
 * accuracy is an AVX2 CPU's; speed is this core's running AVX2 code, not that of an AVX2-only CPU (whose cores
 * may be narrower: AMD Zen 1 splits every 256-bit operation).
 *
 *     gcc -O2 -shared -fPIC -o /tmp/hide_avx512.so benchmarks/hide_avx512.c
 *     LD_PRELOAD=/tmp/hide_avx512.so python benchmarks/bench_quantize_cpu.py ...
 *
 * It sets MEDMAMBA_EDGE_CPUID=avx2, which medmamba_edge.runtime.cpu.describe_cpu reads so that every table
 * names the instruction set the kernels saw.  Without CPUID faulting it says so on stderr and changes nothing.
 * The setting survives fork and is dropped by exec, which reloads the library through LD_PRELOAD.  It owns
 * SIGSEGV: a program that installs its own handler later (Python's faulthandler, so pytest) crashes at its next
 * CPUID; run such code in a plain subprocess, as tests/test_quantize.py does. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* CPUID.(EAX=7, ECX=0) bits: EBX AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31; ECX VBMI 1, VBMI2 6,
 * VNNI 11, BITALG 12, VPOPCNTDQ 14; EDX 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, FP16 23, AMX-TILE 24,
 * AMX-INT8 25.  CPUID.(EAX=7, ECX=1) EAX: AVX-VNNI 4, AVX512_BF16 5. */
#define LEAF7_EBX_HIDDEN 0xDC230000u
#define LEAF7_ECX_HIDDEN 0x00005842u
#define LEAF7_EDX_HIDDEN 0x03C0010Cu
#define LEAF7_1_EAX_HIDDEN 0x00000030u

static long cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void answer_cpuid(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)regs[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real segfault: die of it as without us */
        signal(SIGSEGV, SIG_DFL);
        (void)info;
        raise(sig);
        return;
    }
    uint32_t a = (uint32_t)regs[REG_RAX], b, c = (uint32_t)regs[REG_RCX], d;
    const uint32_t leaf = a, subleaf = c;
    cpuid_faulting(0);
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    cpuid_faulting(1);
    if (leaf == 7 && subleaf == 0) {
        b &= ~LEAF7_EBX_HIDDEN;
        c &= ~LEAF7_ECX_HIDDEN;
        d &= ~LEAF7_EDX_HIDDEN;
    } else if (leaf == 7 && subleaf == 1) {
        a &= ~LEAF7_1_EAX_HIDDEN;
    }
    regs[REG_RAX] = a;
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2;
}

__attribute__((constructor)) static void hide_avx512(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = answer_cpuid;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    if (sigaction(SIGSEGV, &sa, NULL) != 0 || cpuid_faulting(1) != 0) {
        fprintf(stderr, "hide_avx512: this CPU or kernel has no CPUID faulting; AVX-512 stays visible\n");
        return;
    }
    setenv("MEDMAMBA_EDGE_CPUID", "avx2", 1);
}
