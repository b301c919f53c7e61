/**
 * Helpers of the ArcFace inference app that do not depend on MindSpore:
 * command-line parsing, listing and checking the input batches, file output.
 */
#ifndef ARCFACE_ASCEND310_INFER_UTILS_H_
#define ARCFACE_ASCEND310_INFER_UTILS_H_

#include <cstdint>
#include <string>
#include <vector>

namespace arcface {

// One preprocessed face is float32 NCHW [3, 112, 112].
constexpr int64_t kChannels = 3;
constexpr int64_t kHeight = 112;
constexpr int64_t kWidth = 112;
constexpr int64_t kSampleBytes = kChannels * kHeight * kWidth * static_cast<int64_t>(sizeof(float));

struct Options {
  std::string mindir_path;
  std::string input0_path;
  std::string device_type = "Ascend";
  int device_id = 0;
  std::string output_dir = "./result_Files";
  std::string time_dir = "./time_Result";
};

enum class ParseResult { kOk, kHelp, kError };

// Accepts `--name=value` and `--name value`; `-h` / `--help` asks for the usage text.
// On kError, `error` says what is wrong (unknown flag, missing value or required flag, bad number).
ParseResult ParseArgs(int argc, const char *const *argv, Options *options, std::string *error);

std::string Usage(const std::string &program);

// Canonical device name ("Ascend", "GPU", "CPU") for a --device_type value, or "" if unsupported.
// "Ascend310" is accepted as a synonym of "Ascend"; the match ignores case.
std::string NormalizeDeviceType(const std::string &device_type);

struct InputFile {
  std::string path;  // folder + name
  std::string stem;  // name without ".bin"
  int64_t batch = 0;
};

// Regular files ending in ".bin" directly in `dir`, sorted by name, each with its batch size
// (file size / bytes per face). False with `error` set for a missing folder, a folder without
// .bin files, or a file whose size is not a positive multiple of one face.
bool ListInputs(const std::string &dir, std::vector<InputFile> *files, std::string *error);

bool IsReadableFile(const std::string &path);

// Reads the whole file into `data`; false with `error` on failure.
bool ReadFile(const std::string &path, std::vector<char> *data, std::string *error);

// Writes `size` bytes; false with `error` on failure.
bool WriteFile(const std::string &path, const void *data, size_t size, std::string *error);

// mkdir -p; false with `error` on failure.
bool MakeDirs(const std::string &path, std::string *error);

std::string JoinPath(const std::string &dir, const std::string &name);

}  // namespace arcface

#endif  // ARCFACE_ASCEND310_INFER_UTILS_H_
