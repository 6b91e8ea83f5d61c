// Load a vitdeploy engine, read I/O names and labels from its JSON sidecar, run one batch of
// preprocessed images and print the top-5 classes of each.
//
//   vit_infer model.engine batch.f32 N
//
// batch.f32: N x 3 x H x W float32, already normalized (write it from Python with
// vitdeploy.preprocess.load_images(paths, prep).tofile("batch.f32")).
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <numeric>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#define CHECK_CUDA(call)                                                            \
  do {                                                                              \
    cudaError_t e = (call);                                                         \
    if (e != cudaSuccess) {                                                         \
      std::cerr << #call << " failed: " << cudaGetErrorString(e) << std::endl;      \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
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

// The sidecar is plain JSON; a regex is enough for the two things read here.
static std::vector<std::string> sidecarLabels(const std::string& json) {
  std::vector<std::string> labels;
  std::smatch m;
  if (std::regex_search(json, m, std::regex("\"labels\":\\s*\\[([^\\]]*)\\]"))) {
    std::string body = m[1];
    std::regex item("\"((?:[^\"\\\\]|\\\\.)*)\"");
    for (auto it = std::sregex_iterator(body.begin(), body.end(), item); it != std::sregex_iterator(); ++it)
      labels.push_back((*it)[1]);
  }
  return labels;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: vit_infer model.engine batch.f32 N" << std::endl;
    return 2;
  }
  const std::string enginePath = argv[1];
  const int n = std::stoi(argv[3]);
  std::string sidecarPath = enginePath.substr(0, enginePath.find_last_of('.')) + ".json";
  const auto labels = sidecarLabels(readFile(sidecarPath));

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
  const std::string plan = readFile(enginePath);
  std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
  if (!engine) { std::cerr << "cannot deserialize " << enginePath << ": rebuild it for this GPU" << std::endl; return 1; }
  std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};

  const char* input = nullptr;
  const char* output = nullptr;
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? input : output) = name;
  }
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
