/* Matrix-vector products with MLX's affine-quantised weights, for MLX's CPU backend.
 *
 * MLX's CPU quantised matmul dequantises one value at a time (about 0.55 GB/s of packed 4-bit weights on this
 * project's Linux machines): a decode step of a MoE model spends most of its time there. This reads the packed
 * words 8 at a time, one bit-plane of the 8 at a time (value k of every word), against the inputs reordered the
 * same way, so the compiler turns the inner loop into 8-lane vector arithmetic, and splits the output rows
 * over threads.
 *
 * Layout (MLX's): w[e] is [out, in * bits / 32] uint32, value j of a row in bits [bits * (j % per_word), ...)
 * of word j / per_word; scales[e] and biases[e] are [out, in / group_size] float32; value = scale * q + bias.
 * y[n, o] = sum_i x[n, i] * value[expert[n], o, i].
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8

static void reorder_inputs(const float *x, int in, int bits, float *planes, float *group_sums, int group_size) {
    /* Per block of LANES words: planes[k * LANES + w] = x[(block word w) * per_word + k]. */
    const int per_word = 32 / bits, block = LANES * per_word;
    for (int start = 0; start < in; start += block)
        for (int w = 0; w < LANES; w++)
            for (int k = 0; k < per_word; k++)
                planes[start + k * LANES + w] = x[start + w * per_word + k];
    for (int g = 0; g < in / group_size; g++) {
        float sum = 0.0f;
        for (int i = 0; i < group_size; i++) sum += x[g * group_size + i];
        group_sums[g] = sum;
    }
}

static float row_dot(const uint32_t *words, const float *scales, const float *biases, const float *planes,
                     const float *group_sums, int in, int bits, int group_size) {
    const int per_word = 32 / bits, block = LANES * per_word;
    const uint32_t mask = (1u << bits) - 1u;
    const int blocks_per_group = group_size / block;
    float total = 0.0f;
    for (int g = 0; g < in / group_size; g++) {
        float acc[LANES] = {0};
        for (int b = 0; b < blocks_per_group; b++) {
            const int start = (g * blocks_per_group + b) * block;
            const uint32_t *wb = words + start / per_word;
            const float *pb = planes + start;
            for (int k = 0; k < per_word; k++)
                for (int w = 0; w < LANES; w++)
                    acc[w] += (float)((wb[w] >> (bits * k)) & mask) * pb[k * LANES + w];
        }
        float dot = 0.0f;
        for (int w = 0; w < LANES; w++) dot += acc[w];
        total += scales[g] * dot + biases[g] * group_sums[g];
    }
    return total;
}

/* Returns 0, or -1 for shapes this path does not take (the caller keeps MLX's). */
int cpu_qmv(const float *x, int rows, int in, int out, const uint32_t *const *w, const float *const *scales,
            const float *const *biases, int bits, int group_size, float *y) {
    if (bits != 4 && bits != 8) return -1;
    const int block = LANES * (32 / bits);
    if (group_size % block || in % group_size) return -1;
    float *planes = malloc(sizeof(float) * (size_t)in * rows);
    float *group_sums = malloc(sizeof(float) * (size_t)(in / group_size) * rows);
    if (!planes || !group_sums) {
        free(planes);
        free(group_sums);
        return -1;
    }
    for (int n = 0; n < rows; n++)
        reorder_inputs(x + (size_t)n * in, in, bits, planes + (size_t)n * in, group_sums + (size_t)n * (in / group_size),
                       group_size);
    const size_t words_per_row = (size_t)in * bits / 32, groups = in / group_size;
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < rows; n++)
        for (int o = 0; o < out; o++)
            y[(size_t)n * out + o] = row_dot(w[n] + o * words_per_row, scales[n] + o * groups, biases[n] + o * groups,
                                             planes + (size_t)n * in, group_sums + (size_t)n * groups, in, bits,
                                             group_size);
    free(planes);
    free(group_sums);
    return 0;
}
