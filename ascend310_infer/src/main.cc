/**
 * ArcFace inference with the MindSpore C++ API: runs an exported backbone (MINDIR) on every
 * preprocessed .bin batch of a folder and writes one embedding file per batch, plus the average
 * latency per batch.
 *
 * Two ways to build the model, chosen at compile time (see CMakeLists.txt):
 *  - default (MindSpore Lite): Model::Build(mindir_path, ModelType::kMindIR, context);
 *  - ARCFACE_BUILD_FROM_GRAPH_CELL (full MindSpore install, libmindspore.so):
 *    Serialization::Load(mindir_path, ModelType::kMindIR, &graph), then Model::Build(GraphCell(graph), context).
 */
#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "include/api/context.h"
#include "include/api/model.h"
#include "include/api/status.h"
#include "include/api/types.h"
#ifdef ARCFACE_BUILD_FROM_GRAPH_CELL
#include "include/api/cell.h"
#include "include/api/graph.h"
#include "include/api/serialization.h"
#endif

#include "utils.h"

namespace {

constexpr int kUsageError = 2;
constexpr int kRunError = 1;

int Fail(const std::string &message) {
  std::cerr << "error: " << message << std::endl;
  return kRunError;
}

std::string ShapeText(const std::vector<int64_t> &shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

std::string StatusText(const mindspore::Status &status) {
  std::string text = status.ToString();
  const std::string detail = status.GetErrDescription();
  if (!detail.empty() && text.find(detail) == std::string::npos) text += (text.empty() ? "" : " ") + detail;
  return text.empty() ? "status code " + std::to_string(static_cast<int>(status.StatusCode())) : text;
}

std::shared_ptr<mindspore::Context> MakeContext(const std::string &device, int device_id) {
  auto context = std::make_shared<mindspore::Context>();
  auto &devices = context->MutableDeviceInfo();
  if (device == "Ascend") {
    auto info = std::make_shared<mindspore::Ascend310DeviceInfo>();
    info->SetDeviceID(static_cast<uint32_t>(device_id));
    devices.push_back(info);
  } else if (device == "GPU") {
    auto info = std::make_shared<mindspore::GPUDeviceInfo>();
    info->SetDeviceID(static_cast<uint32_t>(device_id));
    devices.push_back(info);
  } else {
    devices.push_back(std::make_shared<mindspore::CPUDeviceInfo>());
  }
  return context;
}

// Loads the MINDIR and builds it for the context's device; on failure `error` says which step failed.
bool BuildModelOrThrow(mindspore::Model *model, const std::string &mindir_path,
                       const std::shared_ptr<mindspore::Context> &context, const std::string &device_label,
                       std::string *error) {
#ifdef ARCFACE_BUILD_FROM_GRAPH_CELL
  mindspore::Graph graph;
  mindspore::Status status = mindspore::Serialization::Load(mindir_path, mindspore::ModelType::kMindIR, &graph);
  if (status != mindspore::kSuccess) {
    *error = "cannot load MINDIR '" + mindir_path + "': " + StatusText(status);
    return false;
  }
  status = model->Build(mindspore::GraphCell(graph), context);
  if (status != mindspore::kSuccess) {
    *error = "cannot build the model from '" + mindir_path + "' on " + device_label + ": " + StatusText(status);
    return false;
  }
#else
  mindspore::Status status = model->Build(mindir_path, mindspore::ModelType::kMindIR, context);
  if (status != mindspore::kSuccess) {
    *error = "cannot load or build MINDIR '" + mindir_path + "' on " + device_label + ": " + StatusText(status) +
             " (the runtime's log above has the cause; a MINDIR exported by a newer MindSpore than the runtime"
             " cannot be read)";
    return false;
  }
#endif
  return true;
}

// Some runtimes throw (e.g. Serialization::Load on a MINDIR of a newer MindSpore) instead of returning a Status.
bool BuildModel(mindspore::Model *model, const std::string &mindir_path,
                const std::shared_ptr<mindspore::Context> &context, const std::string &device_label,
                std::string *error) {
  try {
    return BuildModelOrThrow(model, mindir_path, context, device_label, error);
  } catch (const std::exception &e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));  // drop the runtime's call stack
    *error = "cannot load or build MINDIR '" + mindir_path + "' on " + device_label + ": " + what;
    return false;
  }
}

int Run(int argc, char **argv) {
  const std::string program = argc > 0 ? argv[0] : "main";
  arcface::Options options;
  std::string error;
  switch (arcface::ParseArgs(argc, argv, &options, &error)) {
    case arcface::ParseResult::kHelp:
      std::cout << arcface::Usage(program);
      return 0;
    case arcface::ParseResult::kError:
      std::cerr << "error: " << error << "\n\n" << arcface::Usage(program);
      return kUsageError;
    case arcface::ParseResult::kOk:
      break;
  }
  const std::string device = arcface::NormalizeDeviceType(options.device_type);
  const std::string device_label =
      device == "CPU" ? std::string("CPU") : device + " (device id " + std::to_string(options.device_id) + ")";

  // Check everything that needs no device before building the model.
  if (!arcface::IsReadableFile(options.mindir_path)) {
    return Fail("MINDIR file '" + options.mindir_path + "' does not exist or cannot be read");
  }
  std::vector<arcface::InputFile> inputs;
  if (!arcface::ListInputs(options.input0_path, &inputs, &error)) return Fail(error);
  if (!arcface::MakeDirs(options.output_dir, &error) || !arcface::MakeDirs(options.time_dir, &error)) {
    return Fail(error);
  }

  std::cout << "building " << options.mindir_path << " on " << device_label << std::endl;
  mindspore::Model model;
  if (!BuildModel(&model, options.mindir_path, MakeContext(device, options.device_id), device_label, &error)) {
    return Fail(error);
  }
  std::vector<mindspore::MSTensor> model_inputs = model.GetInputs();
  if (model_inputs.size() != 1) {
    return Fail("the model has " + std::to_string(model_inputs.size()) + " inputs; an ArcFace backbone has one");
  }
  if (model_inputs[0].DataType() != mindspore::DataType::kNumberTypeFloat32) {
    return Fail("the model input is not float32 (data type " +
                std::to_string(static_cast<int>(model_inputs[0].DataType())) + ")");
  }
  std::cout << "model input " << model_inputs[0].Name() << " " << ShapeText(model_inputs[0].Shape()) << ", "
            << inputs.size() << " batch file(s) in " << options.input0_path << std::endl;

  double total_ms = 0.0;
  std::vector<char> data;
  for (const arcface::InputFile &file : inputs) {
    const std::vector<int64_t> shape = {file.batch, arcface::kChannels, arcface::kHeight, arcface::kWidth};
    if (model_inputs[0].Shape() != shape) {  // dynamic batch (-1) or another fixed batch
      mindspore::Status status = model.Resize(model_inputs, {shape});
      if (status != mindspore::kSuccess) {
        return Fail("cannot resize the model input from " + ShapeText(model_inputs[0].Shape()) + " to " +
                    ShapeText(shape) + " for '" + file.path + "': " + StatusText(status));
      }
      model_inputs = model.GetInputs();
    }
    if (!arcface::ReadFile(file.path, &data, &error)) return Fail(error);
    std::vector<mindspore::MSTensor> feeds;
    feeds.emplace_back(model_inputs[0].Name(), mindspore::DataType::kNumberTypeFloat32, shape, data.data(),
                       data.size());
    std::vector<mindspore::MSTensor> outputs;
    auto start = std::chrono::steady_clock::now();
    mindspore::Status status = model.Predict(feeds, &outputs);
    auto stop = std::chrono::steady_clock::now();
    if (status != mindspore::kSuccess) return Fail("inference failed on '" + file.path + "': " + StatusText(status));
    if (outputs.empty()) return Fail("the model returned no output for '" + file.path + "'");
    const mindspore::MSTensor &embedding = outputs[0];
    if (embedding.DataType() != mindspore::DataType::kNumberTypeFloat32) {
      return Fail("output 0 is not float32 (data type " + std::to_string(static_cast<int>(embedding.DataType())) +
                  ")");
    }
    std::shared_ptr<const void> bytes = embedding.Data();
    if (bytes == nullptr) return Fail("output 0 of '" + file.path + "' has no data");
    const std::string out_path = arcface::JoinPath(options.output_dir, file.stem + "_0.bin");
    if (!arcface::WriteFile(out_path, bytes.get(), embedding.DataSize(), &error)) return Fail(error);
    double ms = std::chrono::duration<double, std::milli>(stop - start).count();
    total_ms += ms;
    std::cout << file.path << ": batch " << file.batch << " -> " << out_path << " " << ShapeText(embedding.Shape())
              << ", " << ms << " ms" << std::endl;
  }

  const int count = static_cast<int>(inputs.size());
  char line[128];
  std::snprintf(line, sizeof(line), "NN inference cost average time: %4.3f ms of infer_count %d", total_ms / count,
                count);
  const std::string time_path = arcface::JoinPath(options.time_dir, "test_perform_static.txt");
  const std::string text = std::string(line) + "\n";
  if (!arcface::WriteFile(time_path, text.data(), text.size(), &error)) return Fail(error);
  std::cout << line << " (written to " << time_path << ")" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char **argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception &e) {
    return Fail(std::string("unexpected exception: ") + e.what());
  }
}
