// Load a vitdeploy engine, read its flavour, I/O names and labels from its JSON sidecar, run one
// batch of preprocessed images and print the top-5 classes of each.
//
//   vit_infer model.engine batch.f32 N
//
// batch.f32: N x 3 x H x W float32, already normalized (write it from Python with
// vitdeploy.preprocess.load_images(paths, prep).tofile("batch.f32")).
// Built with -DUSE_TENSORRT_RTX=ON (VITDEPLOY_TENSORRT_RTX) it links TensorRT-RTX and runs TensorRT-RTX
// engines; otherwise full TensorRT. The API used here is common to both, so either branch compiles
// against either flavour's headers.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#ifdef VITDEPLOY_TENSORRT_RTX
static const char* kFlavour = "tensorrt_rtx";
static const char* kFlavourTitle = "TensorRT-RTX";
static const char* kOtherBuild = "configure without -DUSE_TENSORRT_RTX and link full TensorRT";
#else
static const char* kFlavour = "tensorrt";
static const char* kFlavourTitle = "TensorRT";
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

// What the program needs from the engine's sidecar (vitdeploy/engines/sidecar.py writes it).
struct Sidecar {
  std::string flavour, trtVersion, precision, input, output;
  std::vector<std::string> labels;
};

[[noreturn]] static void fail(const std::string& msg) {
  std::cerr << "vit_infer: " << msg << std::endl;
  std::exit(1);
}

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
      const auto mode = t.at("mode").get<std::string>();
      (mode == "input" ? s.input : s.output) = t.at("name").get<std::string>();
    }
    const auto model = j.find("model");
    if (model != j.end() && model->is_object() && model->contains("labels"))
      s.labels = model->at("labels").get<std::vector<std::string>>();
  } catch (const json::exception& e) {
    fail("sidecar " + path + " is malformed (" + e.what() + "): rebuild the engine with `vitdeploy build`");
  }
  if (s.input.empty() || s.output.empty()) fail("sidecar " + path + " lists no input or no output tensor");
  return s;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: vit_infer model.engine batch.f32 N" << std::endl;
    return 2;
  }
  const std::string enginePath = argv[1];
  const int n = std::stoi(argv[3]);
  const auto dot = enginePath.find_last_of('.');
  const auto slash = enginePath.find_last_of('/');
  const std::string stem = (dot == std::string::npos || (slash != std::string::npos && dot < slash))
                               ? enginePath : enginePath.substr(0, dot);
  const Sidecar side = readSidecar(stem + ".json");
  if (side.flavour != kFlavour)
    fail(enginePath + " is a " + side.flavour + " engine (" + side.trtVersion + "); this program runs " + kFlavour +
         " engines: " + kOtherBuild + ", or rebuild the engine with `vitdeploy build --trt " +
         (std::string(kFlavour) == "tensorrt" ? "tensorrt" : "rtx") + "`");
  const auto& labels = side.labels;
  std::cerr << "engine " << enginePath << ": " << kFlavourTitle << " " << side.trtVersion << ", " << side.precision
            << ", input " << side.input << ", output " << side.output << ", " << labels.size() << " labels"
            << std::endl;

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
  if (!runtime || logger.errors)
    fail(std::string("createInferRuntime failed (the ") + kFlavourTitle + " error above): " + kFlavourTitle +
         " needs an NVIDIA GPU with a driver new enough for its CUDA version");
  const std::string plan = readFile(enginePath);
  std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
  if (!engine)
    fail("cannot deserialize " + enginePath + " (the " + kFlavourTitle + " error above): where it names another GPU or " +
         kFlavourTitle + " version, rebuild the engine on this one with `vitdeploy build`");
  std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};

  const char* input = side.input.c_str();
  const char* output = side.output.c_str();
  if (engine->getTensorIOMode(input) != nvinfer1::TensorIOMode::kINPUT ||
      engine->getTensorIOMode(output) != nvinfer1::TensorIOMode::kOUTPUT)
    fail(enginePath + " has no input " + side.input + " / output " + side.output + " as its sidecar says: rebuild both");
  nvinfer1::Dims inDims = engine->getTensorShape(input);
  inDims.d[0] = n;
  if (!context->setInputShape(input, inDims)) { std::cerr << "batch " << n << " is outside the profile" << std::endl; return 1; }
  const size_t inCount = std::accumulate(inDims.d, inDims.d + inDims.nbDims, size_t{1}, std::multiplies<size_t>());
  const nvinfer1::Dims outDims = context->getTensorShape(output);
  const int classes = outDims.d[outDims.nbDims - 1];

  std::string hostIn = readFile(argv[2]);
  if (hostIn.size() != inCount * sizeof(float)) {
    std::cerr << "batch file has " << hostIn.size() << " bytes, expected " << inCount * sizeof(float) << std::endl;
    return 1;
  }
  std::vector<float> hostOut(static_cast<size_t>(n) * classes);
  void *dIn = nullptr, *dOut = nullptr;
  CHECK_CUDA(cudaMalloc(&dIn, hostIn.size()));
  CHECK_CUDA(cudaMalloc(&dOut, hostOut.size() * sizeof(float)));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  context->setTensorAddress(input, dIn);
  context->setTensorAddress(output, dOut);
  CHECK_CUDA(cudaMemcpyAsync(dIn, hostIn.data(), hostIn.size(), cudaMemcpyHostToDevice, stream));
  if (!context->enqueueV3(stream)) { std::cerr << "enqueue failed" << std::endl; return 1; }
  CHECK_CUDA(cudaMemcpyAsync(hostOut.data(), dOut, hostOut.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));

  for (int b = 0; b < n; ++b) {
    const float* row = hostOut.data() + static_cast<size_t>(b) * classes;
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
  cudaFree(dIn);
  cudaFree(dOut);
  cudaStreamDestroy(stream);
  return 0;
}
