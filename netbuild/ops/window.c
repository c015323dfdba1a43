#section support_code
/* The window geometry and helpers shared by the convolution and pooling ops (netbuild/ops/conv.py,
   netbuild/ops/pool.py): loaded after netbuild.c, before the op's own conv.c or pool.c. */

namespace nbwin {

// The window geometry of one image, 2-d (a 1-d op has H = KH = OH = sh = dh = 1, ph = 0).
struct Geom {
    npy_intp C, H, W;           // input channels, height, width
    npy_intp F, KH, KW;         // filters (conv only), kernel
    npy_intp OH, OW;            // output height, width
    npy_intp sh, sw, dh, dw;    // strides, dilation
    npy_intp ph, pw;            // zeros before each axis
};

// Output lengths of one axis: floor((L + before + after - d*(k-1) - 1) / s) + 1 (< 1: no room).
static inline npy_intp out_length(npy_intp L, npy_intp k, npy_intp s, npy_intp d, npy_intp before,
                                  npy_intp after) {
    npy_intp span = d * (k - 1) + 1, padded = L + before + after;
    return padded < span ? 0 : (padded - span) / s + 1;
}

// The outputs o in [*lo, *hi) of an axis whose reads o*s + off fall inside [0, L).
static inline void inside(npy_intp off, npy_intp s, npy_intp L, npy_intp O, npy_intp* lo,
                          npy_intp* hi) {
    npy_intp a = off >= 0 ? 0 : (-off + s - 1) / s;
    npy_intp b = L - 1 - off < 0 ? 0 : (L - 1 - off) / s + 1;
    if (b > O) b = O;
    if (a > b) a = b;
    *lo = a;
    *hi = b;
}

// The shape (a, b, h, w) of a 2-d op's array, as nd = 4 dims, or as nd = 3 (a, b, w) for a 1-d op.
static inline void dims(npy_intp* d, int nd, npy_intp a, npy_intp b, npy_intp h, npy_intp w) {
    d[0] = a;
    d[1] = b;
    if (nd == 4) {
        d[2] = h;
        d[3] = w;
    } else {
        d[2] = w;
    }
}

// Whether a has the shape d (nd dims); else a ValueError naming the op and the array.
static int check(PyArrayObject* a, int nd, const npy_intp* d, const char* op, const char* what) {
    bool ok = PyArray_NDIM(a) == nd;
    for (int i = 0; ok && i < nd; ++i) ok = PyArray_DIMS(a)[i] == d[i];
    if (!ok) PyErr_Format(PyExc_ValueError, "%s: %s has the wrong shape", op, what);
    return ok ? 0 : -1;
}

}  // namespace nbwin
