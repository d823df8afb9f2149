// TensorRT IPluginV3 wrapper of the CUDA SS2DScan (selective_scan_kernel.cu).
//
// Only TensorRT's headers are needed to build this: every TensorRT object is reached through virtual calls,
// so the library does not link libnvinfer. Those calls follow the headers' class layouts, which hold within a
// major version but not across: TensorRT 11 put IVersionedInterface under ILogger and ILoggerFinder, moving
// findLogger() and log() in their virtual tables. So a library loads into the major version it was built for,
// which medmambaTensorRTMajor() tells the loader (runtime/backends/tensorrt/compat.py checks it).

#include "selective_scan_plugin.h"

#include "selective_scan.h"

#include <algorithm>
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
    int32_t SS2DScanPlugin::*member;
    int32_t defaultValue;
};

constexpr FieldSpec kFields[] = {
    {"delta_softplus", PluginFieldType::kINT32, &SS2DScanPlugin::mDeltaSoftplus, 1},
};

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

void logError(std::string const& message) noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
#ifdef MEDMAMBA_REGISTER_AT_LOAD
    // Loaders that only dlopen the autoload build never call setLoggerFinder(); this build links libnvinfer,
    // whose global logger keeps the plugin's errors from vanishing there.
    if (logger == nullptr)
        logger = getLogger();
#endif
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
    using I = SS2DScanPlugin::Input;
    nvinfer1::Dims const& x = dims[I::kX];
    nvinfer1::Dims const& xDbl = dims[I::kXDbl];
    nvinfer1::Dims const& weight = dims[I::kDtProjsWeight];
    nvinfer1::Dims const& bias = dims[I::kDtProjsBias];
    nvinfer1::Dims const& A = dims[I::kA];
    nvinfer1::Dims const& Ds = dims[I::kDs];
    if (x.nbDims != 4 || xDbl.nbDims != 3 || weight.nbDims != 3 || bias.nbDims != 2 || A.nbDims != 2
        || Ds.nbDims != 1)
        return "expected x (b, D, H, W); x_dbl (b, 4(R+2N), HW); dt_projs_weight (4, D, R); dt_projs_bias (4, D); "
               "A (4D, N); Ds (4D)";
    auto known = [](int64_t d) { return d >= 0; };
    int64_t const channels = x.d[1];
    if (known(A.d[1]) && (A.d[1] < 1 || A.d[1] > MEDMAMBA_SCAN_MAX_D_STATE))
        return "d_state (A.shape[1]) must be in 1.." + std::to_string(MEDMAMBA_SCAN_MAX_D_STATE);
    if (known(weight.d[2]) && weight.d[2] < 1)
        return "dt_rank (dt_projs_weight.shape[2]) must be at least 1";
    if ((known(weight.d[0]) && weight.d[0] != 4) || (known(bias.d[0]) && bias.d[0] != 4))
        return "dt_projs_weight and dt_projs_bias must have 4 directions";
    if (known(channels))
    {
        if ((known(weight.d[1]) && weight.d[1] != channels) || (known(bias.d[1]) && bias.d[1] != channels)
            || (known(A.d[0]) && A.d[0] != 4 * channels) || (known(Ds.d[0]) && Ds.d[0] != 4 * channels))
            return "dt_projs_weight, dt_projs_bias, A and Ds must match x's channels (x.shape[1])";
    }
    if (known(x.d[0]) && known(xDbl.d[0]) && xDbl.d[0] != x.d[0])
        return "x_dbl.shape[0] must be x's batch";
    if (known(x.d[2]) && known(x.d[3]) && known(xDbl.d[2]) && xDbl.d[2] != x.d[2] * x.d[3])
        return "x_dbl.shape[2] must be H * W of x";
    if (known(weight.d[2]) && known(A.d[1]) && known(xDbl.d[1]) && xDbl.d[1] != 4 * (weight.d[2] + 2 * A.d[1]))
        return "x_dbl.shape[1] must be 4 * (dt_rank + 2 * d_state)";
    if (known(x.d[0]) && x.d[0] > 65535)
        return "batch must be at most 65535";
    if (known(channels) && known(x.d[2]) && known(x.d[3])
        && std::max<int64_t>(channels, 8) * x.d[2] * x.d[3] > INT_MAX)
        return "channels * H * W must fit in int32";
    return {};
}

// Dims as the C ABI takes them; all known by the time TensorRT asks for workspace or enqueues.
size_t workspaceSize(nvinfer1::Dims const& x)
{
    return medmamba_ss2d_scan_workspace_size(
        static_cast<int>(x.d[0]), static_cast<int>(x.d[1]), static_cast<int>(x.d[2]), static_cast<int>(x.d[3]));
}

} // namespace

SS2DScanPlugin::SS2DScanPlugin(int32_t deltaSoftplus)
    : mDeltaSoftplus(deltaSoftplus)
{
}

nvinfer1::IPluginCapability* SS2DScanPlugin::getCapabilityInterface(
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

nvinfer1::IPluginV3* SS2DScanPlugin::clone() noexcept
{
    // The serialisation views point into the original; the clone rebuilds its own on demand.
    auto* copy = new (std::nothrow) SS2DScanPlugin(mDeltaSoftplus);
    if (copy == nullptr)
        logError("out of host memory in clone()");
    return copy;
}

char const* SS2DScanPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SS2DScanPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SS2DScanPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t SS2DScanPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t SS2DScanPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
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

bool SS2DScanPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos > kNbInputs)
        return false;
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
        return false;
    switch (pos)
    {
    case kX: return isIoType(desc.type);
    case kDtProjsWeight:
    case kDtProjsBias:
    case kA:
    case kDs: return desc.type == DataType::kFLOAT; // weights stay float32 in the fp16 engine too
    default: return desc.type == inOut[kX].desc.type; // x_dbl and y (pos == kNbInputs)
    }
}

int32_t SS2DScanPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 1 || nbInputs != kNbInputs)
        return -1;
    outputTypes[0] = inputTypes[kX];
    return 0;
}

int32_t SS2DScanPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNbInputs || nbOutputs != 1
        || inputs[kX].nbDims != 4)
        return -1;
    // x (b, D, H, W) -> y (b, H, W, D): channel-last, as out_norm reads it.
    outputs[0].nbDims = 4;
    outputs[0].d[0] = inputs[kX].d[0];
    outputs[0].d[1] = inputs[kX].d[2];
    outputs[0].d[2] = inputs[kX].d[3];
    outputs[0].d[3] = inputs[kX].d[1];
    return 0;
}

size_t SS2DScanPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // For the largest profile shape: the kernel's accumulators, used when shared memory cannot hold them.
    if (inputs == nullptr || nbInputs != kNbInputs || inputs[kX].max.nbDims != 4)
        return 0;
    return workspaceSize(inputs[kX].max);
}

int32_t SS2DScanPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
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

int32_t SS2DScanPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs,
    void* workspace, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
        return -1;
    nvinfer1::Dims const& x = inputDesc[kX].dims;
    int const dtype = inputDesc[kX].type == DataType::kHALF ? MEDMAMBA_SCAN_FLOAT16 : MEDMAMBA_SCAN_FLOAT32;
    int const status = medmamba_ss2d_scan_forward(inputs[kX], inputs[kXDbl],
        static_cast<float const*>(inputs[kDtProjsWeight]), static_cast<float const*>(inputs[kDtProjsBias]),
        static_cast<float const*>(inputs[kA]), static_cast<float const*>(inputs[kDs]), outputs[0], workspace,
        workspaceSize(x), static_cast<int>(x.d[0]), static_cast<int>(x.d[1]), static_cast<int>(x.d[2]),
        static_cast<int>(x.d[3]), static_cast<int>(inputDesc[kDtProjsWeight].dims.d[2]),
        static_cast<int>(inputDesc[kA].dims.d[1]), mDeltaSoftplus, dtype, stream);
    if (status != 0)
    {
        logError(std::string("enqueue failed: ") + medmamba_ss2d_scan_error_string(status));
        return -1;
    }
    return 0;
}

nvinfer1::IPluginV3* SS2DScanPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

nvinfer1::PluginFieldCollection const* SS2DScanPlugin::getFieldsToSerialize() noexcept
{
    mSerializedFields.clear();
    for (FieldSpec const& spec : kFields)
        mSerializedFields.emplace_back(spec.name, &(this->*spec.member), spec.type, 1);
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
    mSerializedCollection.fields = mSerializedFields.data();
    return &mSerializedCollection;
}

SS2DScanPluginCreator::SS2DScanPluginCreator()
{
    for (FieldSpec const& spec : kFields)
        mFieldNames.emplace_back(spec.name, nullptr, spec.type, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* SS2DScanPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SS2DScanPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SS2DScanPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

nvinfer1::PluginFieldCollection const* SS2DScanPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* SS2DScanPluginCreator::createPlugin(
    char const* /*name*/, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        // Build and runtime phases both arrive here with the same fields (from the ONNX node, or from
        // getFieldsToSerialize); names the plugin does not know, e.g. the parser's plugin_* bookkeeping,
        // are ignored.
        std::unique_ptr<SS2DScanPlugin> plugin(new SS2DScanPlugin(1));
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
        if (plugin->mDeltaSoftplus != 0 && plugin->mDeltaSoftplus != 1)
        {
            logError("attribute delta_softplus must be 0 or 1, got " + std::to_string(plugin->mDeltaSoftplus));
            return nullptr;
        }
        return plugin.release();
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin: ") + e.what());
    }
    return nullptr;
}

#ifdef MEDMAMBA_REGISTER_AT_LOAD
// The autoload build (libmedmamba_trt_plugin_autoload.so) is for loaders that only dlopen a plugin library and
// never call getCreators(): Triton's tensorrt backend (`plugins=`), LD_PRELOAD, DeepStream's custom-lib-path,
// trtexec --staticPlugins. It registers its creator when loaded, as TensorRT's own plugins do. The default build
// must not: IPluginRegistry::loadLibrary (our runtime, trtexec --dynamicPlugins, version-compatible engines)
// registers getCreators()'s creator itself, and a second registration of the same name fails.
// Not REGISTER_TENSORRT_PLUGIN: it registers under the namespace "", and the ONNX node and the parser look the
// creator up under kPluginNamespace; TensorRT's own library (initLibNvInferPlugins) passes the namespace its
// creators report, and so does this.
namespace
{
struct RegisterAtLoad
{
    SS2DScanPluginCreator creator;
    RegisterAtLoad()
    {
        getPluginRegistry()->registerCreator(creator, kPluginNamespace);
    }
} registerAtLoad;
} // namespace
#endif

} // namespace medmamba_edge

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static medmamba_edge::SS2DScanPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    medmamba_edge::gLoggerFinder.store(finder);
}

extern "C" int32_t medmambaTensorRTMajor()
{
    return NV_TENSORRT_MAJOR;
}
