// What vit_infer makes of an engine's output rows, by the task its sidecar records: a classifier's logits
// (top-5, softmax) or an embedding model's vectors (their L2 norms; with --verify, the cosine of each to the
// golden set's expected vector, at least the artifact's precision allows, as vitdeploy's metrics.TOLERANCES
// says). Plain C++ (no TensorRT or CUDA headers), so tests/test_cpp_example.py compiles and checks it anywhere.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>

namespace vit {

// The L2 norm of one row, summed in double.
inline double rowNorm(const float* row, size_t n) {
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += static_cast<double>(row[i]) * row[i];
  return std::sqrt(sum);
}

// Cosine similarity of two rows; 0 where either is zero or not finite (a broken row never passes).
inline double rowCosine(const float* a, const float* b, size_t n) {
  double dot = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return 0;
    dot += static_cast<double>(a[i]) * b[i];
    aa += static_cast<double>(a[i]) * a[i];
    bb += static_cast<double>(b[i]) * b[i];
  }
  return aa > 0 && bb > 0 ? dot / std::sqrt(aa * bb) : 0;
}

// The lowest cosine an embedding may have to its golden vector in this precision (vitdeploy.metrics.TOLERANCES;
// an unknown precision gets the loosest).
inline double minCosine(const std::string& precision) {
  if (precision == "fp32") return 0.99999;
  if (precision == "fp16") return 0.999;
  if (precision == "bf16") return 0.995;
  if (precision == "int8") return 0.98;
  return 0.95;
}

}  // namespace vit
