// Load a vitdeploy engine, read its flavour, task, I/O names, types and labels from its JSON sidecar, run N
// preprocessed images and print the top-5 classes of each (a classifier) or the size and L2 norm of each
// image's embedding (an embedding model: its sidecar's task; any output name and size, outputs.h). The N images run in batches the engine's
// profile takes, read from the engine (batching.h: at most its max batch; a short last batch padded up
// to its min), so a static batch of 1 (the default export) runs them one by one.
//
//   vit_infer model.engine batch.bin N
//   vit_infer model.engine --verify GOLDEN_DIR   (the golden set, in the same batches)
//
// batch.bin holds what the engine's input takes, as Python writes it:
//   float32 or float16 input (--fp16-io): N x 3 x H x W float32, normalized,
//     vitdeploy.preprocess.load_images(paths, prep).tofile("batch.bin"); converted here for float16;
//   uint8 input (--uint8-input): N x H x W x 3 uint8 pixels, load_images(paths, prep, uint8=True).tofile(...).
// The output may be float32 or float16. The I/O types are read from the engine (getTensorDataType) and
// must agree with the sidecar's; other types are refused.
// Built with -DUSE_TENSORRT_RTX=ON (VITDEPLOY_TENSORRT_RTX) it links TensorRT-RTX and runs TensorRT-RTX
// engines; otherwise full TensorRT: libnvinfer by default, or with -DUSE_TENSORRT_LEAN=ON
// (VITDEPLOY_TENSORRT_LEAN) the lean runtime libnvinfer_lean, which runs only engines built with
// `vitdeploy build --version-compatible` (NVIDIA/TensorRT #3307). The API used here is common to both
// flavours, so either branch compiles against either flavour's headers.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <nlohmann/json.hpp>

#include "batching.h"
#include "io_types.h"
#include "outputs.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#ifdef VITDEPLOY_TENSORRT_RTX
static const char* kFlavour = "tensorrt_rtx";
static const char* kFlavourTitle = "TensorRT-RTX";
static const char* kOtherBuild = "configure without -DUSE_TENSORRT_RTX and link full TensorRT";
#else
static const char* kFlavour = "tensorrt";
#ifdef VITDEPLOY_TENSORRT_LEAN
static const char* kFlavourTitle = "TensorRT (lean runtime)";
#else
static const char* kFlavourTitle = "TensorRT";
#endif
static const char* kOtherBuild = "configure with -DUSE_TENSORRT_RTX=ON and link TensorRT-RTX";
#endif
static const char* kSidecarFormat = "vitdeploy-engine/1";

#define CHECK_CUDA(call)                                                            \
  do {                                                                              \
    cudaError_t e = (call);                                                         \
    if (e != cudaSuccess) {                                                         \
      std::cerr << #call << " failed: " << cudaGetErrorString(e) << std::endl;      \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

class Logger : public nvinfer1::ILogger {
 public:
  int errors = 0;  // TensorRT reports some failures (no GPU, no driver) only here, with a usable-looking object
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) ++errors;
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << std::endl;
  }
};

static std::string readFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) { std::cerr << "cannot open " << path << std::endl; std::exit(1); }
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

[[noreturn]] static void fail(const std::string& msg) {
  std::cerr << "vit_infer: " << msg << std::endl;
  std::exit(1);
}

// One I/O tensor as the sidecar lists it: shape with -1 for the batch of a dynamic profile.
struct Tensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  nvinfer1::DataType type = nvinfer1::DataType::kFLOAT;
};

// What the program needs from the engine's sidecar (vitdeploy/engines/sidecar.py writes it).
struct Sidecar {
  std::string flavour, trtVersion, precision, task = "classification";
  Tensor input, output;
  bool versionCompatible = false;
  std::vector<std::string> labels;
};

static Sidecar readSidecar(const std::string& path) {
  using nlohmann::json;
  std::ifstream f(path);
  if (!f) fail("the engine has no sidecar " + path + ": rebuild it with `vitdeploy build`");
  json j;
  try {
    j = json::parse(f);
  } catch (const json::parse_error& e) {
    fail("sidecar " + path + " is not valid JSON (" + e.what() + "): rebuild the engine with `vitdeploy build`");
  }
  Sidecar s;
  try {
    if (!j.is_object() || j.value("format", "") != kSidecarFormat)
      fail("sidecar " + path + " is not a vitdeploy engine sidecar (" + kSidecarFormat + ")");
    s.flavour = j.at("flavour").get<std::string>();
    s.trtVersion = j.at("trt_version").get<std::string>();
    s.precision = j.value("precision", "unknown");
    for (const auto& t : j.at("io")) {
      Tensor& io = t.at("mode").get<std::string>() == "input" ? s.input : s.output;
      io.name = t.at("name").get<std::string>();
      io.dtype = t.at("dtype").get<std::string>();
      io.shape = t.at("shape").get<std::vector<int64_t>>();
    }
    const auto options = j.find("options");
    if (options != j.end() && options->is_object()) s.versionCompatible = options->value("version_compatible", false);
    const auto model = j.find("model");
    if (model != j.end() && model->is_object() && model->contains("labels"))
      s.labels = model->at("labels").get<std::vector<std::string>>();
    if (model != j.end() && model->is_object()) s.task = model->value("task", std::string("classification"));
  } catch (const json::exception& e) {
    fail("sidecar " + path + " is malformed (" + e.what() + "): rebuild the engine with `vitdeploy build`");
  }
  if (s.input.name.empty() || s.output.name.empty()) fail("sidecar " + path + " lists no input or no output tensor");
  if (s.input.shape.size() < 2 || s.output.shape.size() != 2)
    fail("sidecar " + path + " has an input or output shape this program does not handle: [N, ...] in, [N, classes] out");
  return s;
}

// Refuse, before TensorRT is touched, what this build cannot run: the other flavour, I/O types other than
// float32/float16/uint8, and (lean runtime) an engine that is not version-compatible.
static void checkSidecar(Sidecar& side, const std::string& enginePath) {
  if (side.flavour != kFlavour)
    fail(enginePath + " is a " + side.flavour + " engine (" + side.trtVersion + "); this program runs " + kFlavour +
         " engines: " + kOtherBuild + ", or rebuild the engine with `vitdeploy build --trt " +
         (std::string(kFlavour) == "tensorrt" ? "tensorrt" : "rtx") + "`");
  for (Tensor* t : {&side.input, &side.output})
    if (!vit::parseDataType(t->dtype, t->type))
      fail(enginePath + ": " + t->name + " is " + t->dtype + "; this program handles float32, float16 and uint8 "
           "I/O (export with --fp16-io, --uint8-input or neither)");
  if (side.output.type == nvinfer1::DataType::kUINT8) fail(enginePath + ": a uint8 output is not logits");
#ifdef VITDEPLOY_TENSORRT_LEAN
  if (!side.versionCompatible)
    fail(enginePath + " was not built with --version-compatible, and this program links TensorRT's lean runtime "
         "(libnvinfer_lean), which runs only version-compatible engines: rebuild it with `vitdeploy build "
         "--version-compatible`, or configure without -DUSE_TENSORRT_LEAN to link full libnvinfer");
#endif
}

static size_t volume(const std::vector<int64_t>& shape, int n) {
  size_t v = static_cast<size_t>(n);
  for (size_t i = 1; i < shape.size(); ++i) v *= static_cast<size_t>(shape[i]);
  return v;
}

// The batch file as the engine's input type wants it: uint8 pixels as they are, float32 as it is or
// converted to float16.
static std::string hostInput(const std::string& path, const Tensor& in, int n) {
  const size_t count = volume(in.shape, n);
  const bool pixels = in.type == nvinfer1::DataType::kUINT8;
  std::string raw = readFile(path);
  const size_t expected = count * (pixels ? 1 : sizeof(float));
  if (raw.size() != expected)
    fail("batch file " + path + " has " + std::to_string(raw.size()) + " bytes, expected " + std::to_string(expected) +
         ": " + std::to_string(count) + (pixels ? " uint8 pixels" : " float32 values") + " for input " + in.name +
         " (" + vit::dataTypeName(in.type) + ")");
  if (in.type != nvinfer1::DataType::kHALF) return raw;
  std::string half(count * sizeof(uint16_t), '\0');
  for (size_t i = 0; i < count; ++i) {
    float v;
    std::memcpy(&v, raw.data() + i * sizeof v, sizeof v);
    const uint16_t h = vit::floatToHalf(v);
    std::memcpy(&half[i * sizeof h], &h, sizeof h);
  }
  return half;
}

// The engine is the authority on its I/O: it must be what the sidecar said (and the host buffer was made for).
static void checkEngine(const nvinfer1::ICudaEngine& engine, const Sidecar& side, const std::string& enginePath) {
  for (const Tensor* t : {&side.input, &side.output}) {
    const auto mode = t == &side.input ? nvinfer1::TensorIOMode::kINPUT : nvinfer1::TensorIOMode::kOUTPUT;
    if (engine.getTensorIOMode(t->name.c_str()) != mode)
      fail(enginePath + " has no " + (t == &side.input ? "input " : "output ") + t->name + " as its sidecar says: rebuild both");
    const nvinfer1::DataType type = engine.getTensorDataType(t->name.c_str());
    if (type != t->type)
      fail(enginePath + ": " + t->name + " is " + vit::dataTypeName(type) + " in the engine but " +
           vit::dataTypeName(t->type) + " in its sidecar: rebuild both with `vitdeploy build`");
  }
  const nvinfer1::Dims dims = engine.getTensorShape(side.input.name.c_str());
  for (int i = 1; i < dims.nbDims; ++i)
    if (dims.nbDims != static_cast<int>(side.input.shape.size()) || dims.d[i] != side.input.shape[i])
      fail(enginePath + ": input " + side.input.name + " has another shape in the engine than in its sidecar: rebuild both");
}

// Run one batch the profile takes; the logits as float32, [n, classes].
static std::vector<float> inferBatch(nvinfer1::ICudaEngine& engine, nvinfer1::IExecutionContext* context,
                                     const Sidecar& side, const std::string& hostIn, int n) {
  const char* input = side.input.name.c_str();
  const char* output = side.output.name.c_str();
  nvinfer1::Dims inDims = engine.getTensorShape(input);
  inDims.d[0] = n;
  if (!context->setInputShape(input, inDims)) fail("batch " + std::to_string(n) + " is outside the engine's profile");
  const nvinfer1::Dims outDims = context->getTensorShape(output);
  const size_t classes = static_cast<size_t>(outDims.d[outDims.nbDims - 1]);
  const nvinfer1::DataType outType = engine.getTensorDataType(output);
  std::vector<char> hostOut(static_cast<size_t>(n) * classes * vit::dataTypeSize(outType));
  void *dIn = nullptr, *dOut = nullptr;  // cudaMalloc's 256-byte alignment is what TensorRT requires
  CHECK_CUDA(cudaMalloc(&dIn, hostIn.size()));
  CHECK_CUDA(cudaMalloc(&dOut, hostOut.size()));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  if (!context->setTensorAddress(input, dIn) || !context->setTensorAddress(output, dOut))
    fail("setTensorAddress failed (the TensorRT error above)");
  CHECK_CUDA(cudaMemcpyAsync(dIn, hostIn.data(), hostIn.size(), cudaMemcpyHostToDevice, stream));
  if (!context->enqueueV3(stream)) fail("enqueueV3 failed (the TensorRT error above)");
  CHECK_CUDA(cudaMemcpyAsync(hostOut.data(), dOut, hostOut.size(), cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaFree(dIn);
  cudaFree(dOut);
  cudaStreamDestroy(stream);
  std::vector<float> logits(static_cast<size_t>(n) * classes);
  for (size_t i = 0; i < logits.size(); ++i) {
    if (outType == nvinfer1::DataType::kHALF) {
      uint16_t h;
      std::memcpy(&h, hostOut.data() + i * sizeof h, sizeof h);
      logits[i] = vit::halfToFloat(h);
    } else {
      std::memcpy(&logits[i], hostOut.data() + i * sizeof(float), sizeof(float));
    }
  }
  return logits;
}

// The batch sizes the engine takes (its profile 0; a static batch: that batch), read from the engine.
static std::pair<int, int> batchRange(const nvinfer1::ICudaEngine& engine, const char* input) {
  const nvinfer1::Dims dims = engine.getTensorShape(input);
  if (dims.d[0] > 0) return {static_cast<int>(dims.d[0]), static_cast<int>(dims.d[0])};
  const nvinfer1::Dims lo = engine.getProfileShape(input, 0, nvinfer1::OptProfileSelector::kMIN);
  const nvinfer1::Dims hi = engine.getProfileShape(input, 0, nvinfer1::OptProfileSelector::kMAX);
  return {static_cast<int>(lo.d[0]), static_cast<int>(hi.d[0])};
}

// Run n images in batches the engine's profile takes (batching.h); the logits as float32, [n, classes].
static std::vector<float> infer(nvinfer1::ICudaEngine& engine, const Sidecar& side, const std::string& hostIn, int n) {
  std::unique_ptr<nvinfer1::IExecutionContext> context{engine.createExecutionContext()};
  if (!context) fail("createExecutionContext failed (the TensorRT error above; often too little free GPU memory)");
  const auto [lo, hi] = batchRange(engine, side.input.name.c_str());
  const std::vector<vit::Chunk> chunks = vit::batchChunks(n, lo, hi);
  if (chunks.empty()) fail("the engine's batch profile " + std::to_string(lo) + ".." + std::to_string(hi) + " is unusable");
  if (chunks.size() > 1 || chunks[0].padded != n)
    std::cerr << n << " images in " << chunks.size() << " batch(es) of the engine's " << lo << ".." << hi << std::endl;
  const size_t imageBytes = hostIn.size() / static_cast<size_t>(n);
  std::vector<float> logits;
  for (const vit::Chunk& c : chunks) {
    const std::vector<float> out = inferBatch(engine, context.get(), side, vit::chunkInput(hostIn, imageBytes, c), c.padded);
    const size_t classes = out.size() / static_cast<size_t>(c.padded);
    logits.insert(logits.end(), out.begin(), out.begin() + static_cast<std::ptrdiff_t>(classes * c.count));
  }
  return logits;
}

// An embedding model's rows: each image's embedding size and L2 norm, and its first values.
static void printEmbeddings(const std::vector<float>& rows, int n) {
  const size_t size = rows.size() / static_cast<size_t>(n);
  for (int b = 0; b < n; ++b) {
    const float* row = rows.data() + static_cast<size_t>(b) * size;
    std::cout << "image " << b << ": embedding of " << size << ", norm " << vit::rowNorm(row, size) << ", [";
    for (size_t i = 0; i < std::min<size_t>(4, size); ++i) std::cout << (i ? " " : "") << row[i];
    std::cout << (size > 4 ? " ...]" : "]") << std::endl;
  }
}

// An embedding model's golden check: each image's cosine to its expected vector, at least the precision allows.
static int checkGoldenEmbeddings(const std::vector<float>& got, const std::vector<float>& want, int n,
                                 const std::string& precision) {
  const size_t size = got.size() / static_cast<size_t>(n);
  const double floor = vit::minCosine(precision);
  int bad = 0;
  for (int b = 0; b < n; ++b) {
    const double cosine = vit::rowCosine(got.data() + b * size, want.data() + b * size, size);
    bad += cosine >= floor ? 0 : 1;
    std::cout << "golden " << b << ": cosine " << cosine << (cosine >= floor ? " ok" : " DRIFT") << " (at least "
              << floor << " in " << precision << ")" << std::endl;
  }
  return bad;
}

static void printTop5(const std::vector<float>& logits, int n, const std::vector<std::string>& labels) {
  const int classes = static_cast<int>(logits.size() / static_cast<size_t>(n));
  for (int b = 0; b < n; ++b) {
    const float* row = logits.data() + static_cast<size_t>(b) * classes;
    const float mx = *std::max_element(row, row + classes);
    std::vector<double> p(classes);
    double sum = 0;
    for (int c = 0; c < classes; ++c) sum += p[c] = std::exp(row[c] - mx);
    std::vector<int> idx(classes);
    std::iota(idx.begin(), idx.end(), 0);
    const int k = std::min(5, classes);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int c) { return p[a] > p[c]; });
    std::cout << "image " << b << ":";
    for (int j = 0; j < k; ++j)
      std::cout << " " << (idx[j] < static_cast<int>(labels.size()) ? labels[idx[j]] : std::to_string(idx[j]))
                << " " << p[idx[j]] / sum;
    std::cout << std::endl;
  }
}

// The golden set `vitdeploy verify --write-tensors DIR` wrote: its images preprocessed as the engine takes them
// (golden_input.bin) and torch FP32's logits for them (golden_logits.bin). Returns the image count.
static int goldenCount(const std::string& dir, const Tensor& in) {
  const bool pixels = in.type == nvinfer1::DataType::kUINT8;
  const size_t perImage = volume(in.shape, 1) * (pixels ? 1 : sizeof(float));
  const size_t bytes = readFile(dir + "/golden_input.bin").size();
  if (bytes == 0 || bytes % perImage != 0)
    fail(dir + "/golden_input.bin holds " + std::to_string(bytes) + " bytes, not a whole number of " +
         std::to_string(perImage) + "-byte images for input " + in.name + ": write it with `vitdeploy verify " +
         "MODEL.onnx --write-tensors " + dir + "` from the ONNX this engine was built from");
  return static_cast<int>(bytes / perImage);
}

// Top-1 of every golden image against the expected logits, where the expected top-1 leads clearly (by more than
// 5% of the logits' largest magnitude; a near-tie may flip in any lower precision). Returns the mismatches.
static int checkGolden(const std::vector<float>& got, const std::string& dir, int n, const Sidecar& side) {
  const std::string raw = readFile(dir + "/golden_logits.bin");
  if (raw.size() != got.size() * sizeof(float))
    fail(dir + "/golden_logits.bin does not match the engine's output size: write both files from this engine's ONNX");
  std::vector<float> want(got.size());
  std::memcpy(want.data(), raw.data(), raw.size());
  if (side.task == "embedding") return checkGoldenEmbeddings(got, want, n, side.precision);
  const size_t classes = got.size() / static_cast<size_t>(n);
  float scale = 1e-12f;
  for (float v : want) scale = std::max(scale, std::fabs(v));
  int bad = 0;
  for (int b = 0; b < n; ++b) {
    const float* w = want.data() + b * classes;
    const float* g = got.data() + b * classes;
    std::vector<size_t> order(classes);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + std::min<size_t>(2, classes), order.end(),
                      [&](size_t x, size_t y) { return w[x] > w[y]; });
    const size_t expected = order[0], top = static_cast<size_t>(std::max_element(g, g + classes) - g);
    const bool decisive = classes < 2 || w[order[0]] - w[order[1]] > 0.05f * scale;
    const bool ok = top == expected || !decisive;
    bad += ok ? 0 : 1;
    std::cout << "golden " << b << ": expected " << expected << ", got " << top
              << (ok ? (top == expected ? " ok" : " ok (near-tie)") : " DRIFT") << std::endl;
  }
  return bad;
}

int main(int argc, char** argv) {
  const bool verify = argc == 4 && std::string(argv[2]) == "--verify";
  if (argc != 4) {
    std::cerr << "usage: vit_infer model.engine batch.bin N\n       vit_infer model.engine --verify GOLDEN_DIR"
              << std::endl;
    return 2;
  }
  const std::string enginePath = argv[1];
  const auto dot = enginePath.find_last_of('.');
  const auto slash = enginePath.find_last_of('/');
  const std::string stem = (dot == std::string::npos || (slash != std::string::npos && dot < slash))
                               ? enginePath : enginePath.substr(0, dot);
  Sidecar side = readSidecar(stem + ".json");
  checkSidecar(side, enginePath);
  const std::string goldenDir = verify ? argv[3] : "";
  const int n = verify ? goldenCount(goldenDir, side.input) : std::atoi(argv[3]);
  if (n < 1) fail(std::string("N must be a positive batch size, not ") + argv[3]);
  const std::string hostIn = hostInput(verify ? goldenDir + "/golden_input.bin" : argv[2], side.input, n);
  std::cerr << "engine " << enginePath << ": " << kFlavourTitle << " " << side.trtVersion << ", " << side.precision
            << ", " << side.task << ", input " << side.input.name << " (" << vit::dataTypeName(side.input.type) << "), output "
            << side.output.name << " (" << vit::dataTypeName(side.output.type) << "), " << side.labels.size()
            << " labels" << (side.versionCompatible ? ", version-compatible" : "") << std::endl;

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
  if (!runtime || logger.errors)
    fail(std::string("createInferRuntime failed (the ") + kFlavourTitle + " error above): " + kFlavourTitle +
         " needs an NVIDIA GPU with a driver new enough for its CUDA version");
#ifndef VITDEPLOY_TENSORRT_RTX
  // a version-compatible plan carries the lean runtime it runs on: host code TensorRT loads only when allowed
  if (side.versionCompatible) runtime->setEngineHostCodeAllowed(true);
#endif
  const std::string plan = readFile(enginePath);
  std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
  if (!engine)
    fail("cannot deserialize " + enginePath + " (the " + kFlavourTitle + " error above): where it names another GPU or " +
         kFlavourTitle + " version, rebuild the engine on this one with `vitdeploy build`");
  checkEngine(*engine, side, enginePath);
  const std::vector<float> logits = infer(*engine, side, hostIn, n);
  if (verify) {
    const int bad = checkGolden(logits, goldenDir, n, side);
    const std::string what = side.task == "embedding" ? " drifted from their embeddings" : " changed top-1";
    std::cout << (bad ? "DRIFT: " + std::to_string(bad) + " of " + std::to_string(n) + " golden images" + what
                      : "PASSED: " + std::to_string(n) + " golden images") << std::endl;
    return bad ? 1 : 0;
  }
  if (side.task == "embedding")
    printEmbeddings(logits, n);
  else
    printTop5(logits, n, side.labels);
  return 0;
}
