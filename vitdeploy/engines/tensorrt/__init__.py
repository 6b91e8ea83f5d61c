"""TensorRT and TensorRT-RTX in one subpackage: ``build`` (ONNX -> engine), ``runtime`` (engine -> logits),
``sidecar`` (the engine's typed JSON sidecar) and ``cuda_memory`` (the small device-memory layer,
cuda-python or pycuda). Nothing here imports TensorRT or CUDA until a function needs it."""
