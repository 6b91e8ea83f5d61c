// How vit_infer splits N images into batches the engine's profile takes (min..max batch), as vitdeploy's
// Python runtime does: chunks of at most max images; a chunk shorter than min (a static batch of 4 and 6
// images: 4, then 2) is padded with copies of its last image, whose logits are dropped. Plain C++ (no
// TensorRT or CUDA headers), so tests/test_cpp_example.py compiles and checks it anywhere.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

namespace vit {

struct Chunk {
  int start;   // first image
  int count;   // images of the set in this chunk
  int padded;  // the batch run: count, or min when count is below it
};

// The chunks for n images and a profile of lo..hi; empty where nothing can run (n < 1 or a bad profile).
inline std::vector<Chunk> batchChunks(int n, int lo, int hi) {
  std::vector<Chunk> out;
  if (n < 1 || lo < 1 || hi < lo) return out;
  for (int start = 0; start < n; start += hi) {
    const int count = std::min(hi, n - start);
    out.push_back({start, count, std::max(count, lo)});
  }
  return out;
}

// One chunk's input bytes: its images, then its last image repeated up to `padded`.
inline std::string chunkInput(const std::string& all, size_t imageBytes, const Chunk& c) {
  std::string out = all.substr(static_cast<size_t>(c.start) * imageBytes, static_cast<size_t>(c.count) * imageBytes);
  const std::string last = out.substr(out.size() - imageBytes);
  for (int i = c.count; i < c.padded; ++i) out += last;
  return out;
}

}  // namespace vit
