// The engine I/O types the example handles (float32, float16, uint8) and the float32 <-> float16
// conversions it needs, without CUDA's cuda_fp16.h. tests/test_cpp_example.py checks the conversions
// bit for bit against numpy's float16.
#pragma once

#include <NvInfer.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace vit {

// The sidecar's dtype names (vitdeploy/engines/tensorrt_build.py: TensorRT's DataType, lower case).
inline bool parseDataType(const std::string& name, nvinfer1::DataType& out) {
  if (name == "float") out = nvinfer1::DataType::kFLOAT;
  else if (name == "half") out = nvinfer1::DataType::kHALF;
  else if (name == "uint8") out = nvinfer1::DataType::kUINT8;
  else return false;
  return true;
}

inline const char* dataTypeName(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kUINT8: return "uint8";
    case nvinfer1::DataType::kINT8: return "int8";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kBOOL: return "bool";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kFP8: return "fp8";
    default: return "another type";
  }
}

inline size_t dataTypeSize(nvinfer1::DataType t) {
  return t == nvinfer1::DataType::kFLOAT ? 4 : t == nvinfer1::DataType::kHALF ? 2 : 1;
}

// IEEE 754 binary32 -> binary16, round to nearest even; overflow to infinity, NaN kept a (quiet) NaN.
inline uint16_t floatToHalf(float value) {
  uint32_t f;
  std::memcpy(&f, &value, sizeof f);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t absF = f & 0x7fffffffu;
  if (absF >= 0x7f800000u) return sign | (absF > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN, infinity
  if (absF >= 0x477ff000u) return sign | 0x7c00u;  // rounds to above 65504: infinity
  if (absF < 0x38800000u) {  // below the smallest normal half (2^-14): a subnormal half, or zero
    if (absF < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): zero
    // value = mant * 2^(e - 150) and a subnormal half is k * 2^-24: k = mant >> (126 - e), 14..24
    const uint32_t mant = (absF & 0x007fffffu) | 0x00800000u;
    const int shift = 126 - static_cast<int>(absF >> 23);
    const uint32_t halfMant = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    const uint32_t rounded = halfMant + (rest > halfway || (rest == halfway && (halfMant & 1u)));
    return sign | static_cast<uint16_t>(rounded);
  }
  const uint32_t biased = absF - 0x38000000u;  // exponent rebased from 127 to 15
  const uint32_t halfBits = biased >> 13;
  const uint32_t rest = biased & 0x1fffu;
  const uint32_t rounded = halfBits + (rest > 0x1000u || (rest == 0x1000u && (halfBits & 1u)));
  return sign | static_cast<uint16_t>(rounded);  // a carry into the exponent is the right result
}

inline float halfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t f;
  if (exponent == 0x1fu) {
    f = sign | 0x7f800000u | (mant << 13);
  } else if (exponent != 0) {
    f = sign | ((exponent + 112u) << 23) | (mant << 13);
  } else {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(mant), -24);
    std::memcpy(&f, &v, sizeof f);
    f |= sign;
  }
  float out;
  std::memcpy(&out, &f, sizeof out);
  return out;
}

}  // namespace vit
