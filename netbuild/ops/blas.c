#section support_code
/* netbuild_gemm: BLAS ?gemm_ for float and double (column-major, as Fortran sees arrays):
   c (m, n) = alpha op(a) op(b) + beta c, safe for empty sizes (k = 0 scales c by beta, as the
   reference BLAS does). Loaded after netbuild.c and PyTensor's BLAS declarations, before the op's
   own .c file, by ops whose C calls BLAS (netbuild.ops.BlasCOp). */

/* OpenBLAS's thread count, if the BLAS is OpenBLAS (weak: another BLAS leaves these NULL). */
extern "C" {
void openblas_set_num_threads(int) __attribute__((weak));
int openblas_get_num_threads(void) __attribute__((weak));
}

/* BLAS on its caller's thread while it lives: inside netbuild's parallel loops each thread calls
   gemm on its own slice, and OpenBLAS's own threads (for PyTensor's large products) would queue
   the calls one behind another (OpenBLAS warns "Detect OpenMP Loop" and runs 6x slower). */
struct netbuild_serial_blas {
    int previous;
    explicit netbuild_serial_blas(int threads) : previous(0) {
        if (threads > 1 && openblas_set_num_threads && openblas_get_num_threads) {
            int n = openblas_get_num_threads();
            if (n > 1) {
                previous = n;
                openblas_set_num_threads(1);
            }
        }
    }
    ~netbuild_serial_blas() {
        if (previous) openblas_set_num_threads(previous);
    }
};

template <typename T>
static inline void netbuild_gemm_empty_k(int m, int n, T beta, T* c, int ldc) {
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i)
            c[(size_t)j * ldc + i] = beta == (T)0 ? (T)0 : beta * c[(size_t)j * ldc + i];
}
static inline void netbuild_gemm(char ta, char tb, int m, int n, int k, float alpha,
                                 const float* a, int lda, const float* b, int ldb, float beta,
                                 float* c, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { netbuild_gemm_empty_k(m, n, beta, c, ldc); return; }
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
static inline void netbuild_gemm(char ta, char tb, int m, int n, int k, double alpha,
                                 const double* a, int lda, const double* b, int ldb, double beta,
                                 double* c, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { netbuild_gemm_empty_k(m, n, beta, c, ldc); return; }
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
