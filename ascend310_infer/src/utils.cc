#include "utils.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

namespace arcface {
namespace {

bool EndsWith(const std::string &text, const std::string &suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string Lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
  return text;
}

bool ParseInt(const std::string &text, int *value) {
  if (text.empty()) return false;
  char *end = nullptr;
  errno = 0;
  long parsed = std::strtol(text.c_str(), &end, 10);
  if (errno != 0 || end == nullptr || *end != '\0' || parsed < 0 || parsed > 1 << 20) return false;
  *value = static_cast<int>(parsed);
  return true;
}

}  // namespace

std::string Usage(const std::string &program) {
  std::ostringstream out;
  out << "Usage: " << program << " --mindir_path=FILE --input0_path=DIR [options]\n"
      << "Runs an exported ArcFace MINDIR on every preprocessed .bin batch in DIR (sorted by name).\n"
      << "Each .bin file is raw float32 NCHW [B, 3, 112, 112]; B = file size / " << kSampleBytes << ".\n\n"
      << "Required:\n"
      << "  --mindir_path=FILE   exported MINDIR model\n"
      << "  --input0_path=DIR    folder of preprocessed .bin batches\n"
      << "Options:\n"
      << "  --device_type=TYPE   Ascend (alias Ascend310), GPU or CPU (default: Ascend)\n"
      << "  --device_id=N        device id for Ascend and GPU (default: 0)\n"
      << "  --output_dir=DIR     embeddings go to DIR/<name>_0.bin (default: ./result_Files)\n"
      << "  --time_dir=DIR       average latency goes to DIR/test_perform_static.txt (default: ./time_Result)\n"
      << "  -h, --help           print this help\n";
  return out.str();
}

std::string NormalizeDeviceType(const std::string &device_type) {
  std::string lower = Lower(device_type);
  if (lower == "ascend" || lower == "ascend310") return "Ascend";
  if (lower == "gpu") return "GPU";
  if (lower == "cpu") return "CPU";
  return "";
}

ParseResult ParseArgs(int argc, const char *const *argv, Options *options, std::string *error) {
  std::map<std::string, std::string *> string_flags = {
      {"mindir_path", &options->mindir_path}, {"input0_path", &options->input0_path},
      {"device_type", &options->device_type}, {"output_dir", &options->output_dir},
      {"time_dir", &options->time_dir}};
  std::string device_id_text;
  bool have_device_id = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help" || arg == "-help") return ParseResult::kHelp;
    if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
      *error = "unexpected argument '" + arg + "' (flags look like --name=value)";
      return ParseResult::kError;
    }
    std::string name = arg.substr(2);
    std::string value;
    size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      *error = "flag --" + name + " needs a value";
      return ParseResult::kError;
    }
    if (name == "device_id") {
      device_id_text = value;
      have_device_id = true;
      continue;
    }
    auto found = string_flags.find(name);
    if (found == string_flags.end()) {
      *error = "unknown flag --" + name;
      return ParseResult::kError;
    }
    *found->second = value;
  }
  if (have_device_id && !ParseInt(device_id_text, &options->device_id)) {
    *error = "--device_id must be a non-negative integer, got '" + device_id_text + "'";
    return ParseResult::kError;
  }
  std::vector<std::string> missing;
  if (options->mindir_path.empty()) missing.push_back("--mindir_path");
  if (options->input0_path.empty()) missing.push_back("--input0_path");
  if (!missing.empty()) {
    *error = "missing required flag" + std::string(missing.size() > 1 ? "s " : " ") + missing[0] +
             (missing.size() > 1 ? " and " + missing[1] : "");
    return ParseResult::kError;
  }
  if (NormalizeDeviceType(options->device_type).empty()) {
    *error = "--device_type must be Ascend, Ascend310, GPU or CPU, got '" + options->device_type + "'";
    return ParseResult::kError;
  }
  if (options->output_dir.empty() || options->time_dir.empty()) {
    *error = "--output_dir and --time_dir must not be empty";
    return ParseResult::kError;
  }
  return ParseResult::kOk;
}

std::string JoinPath(const std::string &dir, const std::string &name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

bool IsReadableFile(const std::string &path) {
  struct stat info;
  if (stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) return false;
  std::ifstream probe(path, std::ios::binary);
  return probe.good();
}

bool ListInputs(const std::string &dir, std::vector<InputFile> *files, std::string *error) {
  files->clear();
  DIR *handle = opendir(dir.c_str());
  if (handle == nullptr) {
    *error = "cannot open input folder '" + dir + "': " + std::strerror(errno);
    return false;
  }
  std::vector<std::string> names;
  while (struct dirent *entry = readdir(handle)) {
    std::string name = entry->d_name;
    if (EndsWith(name, ".bin") && name.size() > 4) names.push_back(name);
  }
  closedir(handle);
  std::sort(names.begin(), names.end());
  for (const std::string &name : names) {
    InputFile file;
    file.path = JoinPath(dir, name);
    file.stem = name.substr(0, name.size() - 4);
    struct stat info;
    if (stat(file.path.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) continue;  // e.g. a folder named x.bin
    int64_t size = static_cast<int64_t>(info.st_size);
    if (size == 0 || size % kSampleBytes != 0) {
      std::ostringstream out;
      out << "input file '" << file.path << "' has " << size << " bytes, not a positive multiple of "
          << kSampleBytes << " (one float32 face of 3x112x112)";
      *error = out.str();
      return false;
    }
    file.batch = size / kSampleBytes;
    files->push_back(file);
  }
  if (files->empty()) {
    *error = "no .bin files in input folder '" + dir + "'";
    return false;
  }
  return true;
}

bool ReadFile(const std::string &path, std::vector<char> *data, std::string *error) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    *error = "cannot open '" + path + "'";
    return false;
  }
  std::streamsize size = in.tellg();
  in.seekg(0, std::ios::beg);
  data->resize(static_cast<size_t>(size));
  if (size > 0 && !in.read(data->data(), size)) {
    *error = "cannot read '" + path + "'";
    return false;
  }
  return true;
}

bool WriteFile(const std::string &path, const void *data, size_t size, std::string *error) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) {
    *error = "cannot create '" + path + "'";
    return false;
  }
  out.write(static_cast<const char *>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) {
    *error = "cannot write '" + path + "'";
    return false;
  }
  return true;
}

bool MakeDirs(const std::string &path, std::string *error) {
  std::string partial;
  size_t start = 0;
  while (start <= path.size()) {
    size_t slash = path.find('/', start);
    if (slash == std::string::npos) slash = path.size();
    partial = path.substr(0, slash);
    if (!partial.empty() && mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      *error = "cannot create folder '" + partial + "': " + std::strerror(errno);
      return false;
    }
    start = slash + 1;
  }
  struct stat info;
  if (stat(path.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) {
    *error = "'" + path + "' is not a folder";
    return false;
  }
  return true;
}

}  // namespace arcface
