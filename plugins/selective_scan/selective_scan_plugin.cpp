// TensorRT IPluginV3 wrapper of the CUDA selective scan (selective_scan_kernel.cu).
//
// Only TensorRT's headers are needed to build this: every TensorRT object is reached through virtual calls,
// so the library does not link libnvinfer and the same binary loads into a process that already has
// TensorRT 10 or 11 (the IPluginV3One* interfaces are versioned and frozen).

#include "selective_scan_plugin.h"

#include "selective_scan.h"

#include <atomic>
#include <climits>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>

namespace medmamba_edge
{
namespace
{

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;

// The plugin's attributes, declared once: getFieldNames, getFieldsToSerialize and createPlugin all walk
// this table, so a new attribute cannot be serialised under one name and parsed under another.
struct FieldSpec
{
    char const* name;
    PluginFieldType type;
    int32_t SelectiveScanPlugin::*member;
    int32_t defaultValue;
};

constexpr FieldSpec kFields[] = {
    {"delta_softplus", PluginFieldType::kINT32, &SelectiveScanPlugin::mDeltaSoftplus, 1},
};

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

void logError(std::string const& message) noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
        logger->log(nvinfer1::ILogger::Severity::kERROR, (std::string(kPluginName) + ": " + message).c_str());
}

bool isIoType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

// Integer attribute value whatever width the ONNX parser or a serialised engine chose.
bool readInt(nvinfer1::PluginField const& field, int32_t& value)
{
    if (field.data == nullptr || field.length < 1)
        return false;
    switch (field.type)
    {
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: value = static_cast<int32_t>(*static_cast<int64_t const*>(field.data)); return true;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    default: return false;
    }
}

// Shape contract of runtime/scan_node.py for the dimensions that are known (>= 0); "" when consistent.
std::string checkShapes(nvinfer1::Dims const* dims)
{
    using I = SelectiveScanPlugin::Input;
    nvinfer1::Dims const& u = dims[I::kU];
    nvinfer1::Dims const& A = dims[I::kA];
    nvinfer1::Dims const& B = dims[I::kB];
    if (u.nbDims != 3 || dims[I::kDelta].nbDims != 3 || A.nbDims != 2 || B.nbDims != 4 || dims[I::kC].nbDims != 4
        || dims[I::kD].nbDims != 1 || dims[I::kDeltaBias].nbDims != 1)
        return "expected u, delta (b, KD, L); A (KD, N); B, C (b, G, N, L); D, delta_bias (KD)";
    auto known = [](int64_t d) { return d >= 0; };
    if (known(A.d[1]) && (A.d[1] < 1 || A.d[1] > MEDMAMBA_SCAN_MAX_D_STATE))
        return "d_state must be in 1.." + std::to_string(MEDMAMBA_SCAN_MAX_D_STATE);
    if (known(u.d[1]) && known(B.d[1]) && (B.d[1] < 1 || u.d[1] % B.d[1] != 0))
        return "groups (B.shape[1]) must divide channels (u.shape[1])";
    if (known(u.d[0]) && u.d[0] > 65535)
        return "batch must be at most 65535";
    for (int32_t i = 0; i < 3; ++i)
        if (u.d[i] > INT_MAX)
            return "dimensions must fit in int32";
    return {};
}

} // namespace

SelectiveScanPlugin::SelectiveScanPlugin(int32_t deltaSoftplus)
    : mDeltaSoftplus(deltaSoftplus)
{
}

nvinfer1::IPluginCapability* SelectiveScanPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* SelectiveScanPlugin::clone() noexcept
{
    // The serialisation views point into the original; the clone rebuilds its own on demand.
    auto* copy = new (std::nothrow) SelectiveScanPlugin(mDeltaSoftplus);
    if (copy == nullptr)
        logError("out of host memory in clone()");
    return copy;
}

char const* SelectiveScanPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SelectiveScanPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SelectiveScanPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t SelectiveScanPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t SelectiveScanPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (in == nullptr || nbInputs != kNbInputs || nbOutputs != 1)
        return -1;
    nvinfer1::Dims dims[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i)
        dims[i] = in[i].desc.dims;
    std::string const problem = checkShapes(dims);
    if (!problem.empty())
    {
        logError(problem);
        return -1;
    }
    return 0;
}

bool SelectiveScanPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos > kNbInputs)
        return false;
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
        return false;
    switch (pos)
    {
    case kU: return isIoType(desc.type);
    case kA:
    case kD:
    case kDeltaBias: return desc.type == DataType::kFLOAT; // parameters stay float32 in the fp16 engine too
    default: return desc.type == inOut[kU].desc.type;      // delta, B, C and y (pos == kNbInputs)
    }
}

int32_t SelectiveScanPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 1 || nbInputs != kNbInputs)
        return -1;
    outputTypes[0] = inputTypes[kU];
    return 0;
}

int32_t SelectiveScanPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNbInputs || nbOutputs != 1
        || inputs[kU].nbDims != 3)
        return -1;
    outputs[0] = inputs[kU];
    return 0;
}

size_t SelectiveScanPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* /*inputs*/,
    int32_t /*nbInputs*/, nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
    int32_t /*nbOutputs*/) const noexcept
{
    return 0; // the scan keeps its carries in registers: no workspace
}

int32_t SelectiveScanPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (in == nullptr || nbInputs != kNbInputs || nbOutputs != 1)
        return -1;
    nvinfer1::Dims dims[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i)
        dims[i] = in[i].dims;
    std::string const problem = checkShapes(dims);
    if (!problem.empty())
    {
        logError(problem);
        return -1;
    }
    return 0;
}

int32_t SelectiveScanPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* /*workspace*/, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
        return -1;
    nvinfer1::Dims const& u = inputDesc[kU].dims;
    int const dtype = inputDesc[kU].type == DataType::kHALF ? MEDMAMBA_SCAN_FLOAT16 : MEDMAMBA_SCAN_FLOAT32;
    int const status = medmamba_selective_scan_forward(inputs[kU], inputs[kDelta],
        static_cast<float const*>(inputs[kA]), inputs[kB], inputs[kC], static_cast<float const*>(inputs[kD]),
        static_cast<float const*>(inputs[kDeltaBias]), outputs[0], static_cast<int>(u.d[0]),
        static_cast<int>(u.d[1]), static_cast<int>(u.d[2]), static_cast<int>(inputDesc[kB].dims.d[1]),
        static_cast<int>(inputDesc[kA].dims.d[1]), mDeltaSoftplus, dtype, stream);
    if (status != 0)
    {
        logError(std::string("enqueue failed: ") + medmamba_selective_scan_error_string(status));
        return -1;
    }
    return 0;
}

nvinfer1::IPluginV3* SelectiveScanPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

nvinfer1::PluginFieldCollection const* SelectiveScanPlugin::getFieldsToSerialize() noexcept
{
    mSerializedFields.clear();
    for (FieldSpec const& spec : kFields)
        mSerializedFields.emplace_back(spec.name, &(this->*spec.member), spec.type, 1);
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
    mSerializedCollection.fields = mSerializedFields.data();
    return &mSerializedCollection;
}

SelectiveScanPluginCreator::SelectiveScanPluginCreator()
{
    for (FieldSpec const& spec : kFields)
        mFieldNames.emplace_back(spec.name, nullptr, spec.type, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* SelectiveScanPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SelectiveScanPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SelectiveScanPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

nvinfer1::PluginFieldCollection const* SelectiveScanPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* SelectiveScanPluginCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        // Build and runtime phases both arrive here with the same fields (from the ONNX node, or from
        // getFieldsToSerialize); names the plugin does not know, e.g. the parser's plugin_* bookkeeping,
        // are ignored.
        std::unique_ptr<SelectiveScanPlugin> plugin(new SelectiveScanPlugin(1));
        for (FieldSpec const& spec : kFields)
            (*plugin).*spec.member = spec.defaultValue;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            nvinfer1::PluginField const& field = fc->fields[i];
            for (FieldSpec const& spec : kFields)
            {
                if (field.name == nullptr || std::strcmp(field.name, spec.name) != 0)
                    continue;
                if (!readInt(field, (*plugin).*spec.member))
                {
                    logError(std::string("attribute ") + spec.name + " must be an integer");
                    return nullptr;
                }
            }
        }
        return plugin.release();
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin: ") + e.what());
    }
    return nullptr;
}

} // namespace medmamba_edge

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static medmamba_edge::SelectiveScanPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    medmamba_edge::gLoggerFinder.store(finder);
}
