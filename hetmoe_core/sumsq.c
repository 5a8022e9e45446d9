/* Sums of squares of bfloat16 values, accumulated in float32 in one pass: the inner loop of MaxNNScore.
 * Built by hetmoe_core/kernels.py with the system C compiler (-O3 -ffp-contract=off) and called through ctypes;
 * kernels.py holds a torch route with the same arithmetic, bit for bit, for machines without a compiler.
 *
 * Arithmetic (the order is part of the results: change it here and in kernels.py together):
 *   a bfloat16 value is the top half of a float32, so the upcast is exact, and so is its square (an 8-bit
 *   significand squared needs 16 bits, float32 has 24);
 *   rows:    element c of a row goes to lane c % LANES, each lane adds its squares in order of c, then the lanes
 *            are added by halving (lane j += lane j + 32, then + 16, ... + 1);
 *   columns: row r of the matrix goes to lane r % LANES (a row of accumulators per lane), each lane adds its rows'
 *            squares in order of r, then the lanes are added by halving, as for rows.
 * Lanes are independent, so a vectorising compiler reorders nothing: the same bits on every CPU.
 */
#include <stdint.h>
#include <string.h>

#define LANES 64

int64_t hetmoe_lanes(void) { return LANES; }

static inline float square_of_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f * f;
}

/* x: [rows, cols] bfloat16 bits, row-major; out: [rows] float32. */
void hetmoe_row_sumsq(const uint16_t *x, int64_t rows, int64_t cols, float *out) {
    float acc[LANES];
    int64_t whole = cols / LANES;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * cols;
        for (int j = 0; j < LANES; j++) acc[j] = 0.0f;
        for (int64_t i = 0; i < whole; i++) {
            const uint16_t *seg = row + i * LANES;
            for (int j = 0; j < LANES; j++) acc[j] += square_of_bf16(seg[j]);
        }
        for (int64_t j = 0; j < cols - whole * LANES; j++) acc[j] += square_of_bf16(row[whole * LANES + j]);
        for (int h = LANES / 2; h >= 1; h /= 2)
            for (int j = 0; j < h; j++) acc[j] += acc[j + h];
        out[r] = acc[0];
    }
}

/* x: [rows, cols] bfloat16 bits, row-major; out: [cols] float32; acc: scratch of min(rows, LANES) * cols floats. */
void hetmoe_col_sumsq(const uint16_t *x, int64_t rows, int64_t cols, float *out, float *acc) {
    int64_t lanes = rows < LANES ? rows : LANES;
    if (lanes == 0) {
        for (int64_t c = 0; c < cols; c++) out[c] = 0.0f;
        return;
    }
    memset(acc, 0, (size_t)(lanes * cols) * sizeof *acc);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * cols;
        float *a = acc + (r % LANES) * cols;
        for (int64_t c = 0; c < cols; c++) a[c] += square_of_bf16(xr[c]);
    }
    for (int64_t h = LANES / 2; h >= 1; h /= 2)
        for (int64_t j = 0; j < h && j + h < lanes; j++) {
            float *a = acc + j * cols, *b = acc + (j + h) * cols;
            for (int64_t c = 0; c < cols; c++) a[c] += b[c];
        }
    memcpy(out, acc, (size_t)cols * sizeof *out);
}
