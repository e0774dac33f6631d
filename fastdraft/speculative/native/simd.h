/* The vector type both kernels compute in: GCC vector extensions, compiled with -march=native, so VW floats
 * fill one register of the CPU it runs on (AVX-512: 16; otherwise, e.g. AVX2: 8). */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vec __attribute__((vector_size(VW * 4), aligned(4)));  /* aligned(4): rows need not be */
typedef int ivec __attribute__((vector_size(VW * 4), aligned(4)));
