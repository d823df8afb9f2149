// TensorRT IPluginV3 for the SS2DScan ONNX node (contract: runtime/scan_node.py).
//
// TensorRT >= 10.3 only (JetPack 6.1+ and TensorRT 11): IPluginV3 does not exist in TensorRT 8.x.
// The library exports getCreators()/setLoggerFinder(), the entry points of trtexec --dynamicPlugins and
// IPluginRegistry::loadLibrary, and registers nothing statically; loadLibrary itself refuses a second load of
// a library whose creator is registered already, so our runtime loads it once (compat.load_plugin_library).
#ifndef MEDMAMBA_SELECTIVE_SCAN_PLUGIN_H
#define MEDMAMBA_SELECTIVE_SCAN_PLUGIN_H

#include <NvInferRuntime.h>

#if NV_TENSORRT_MAJOR < 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR < 3)
#error "the SS2DScan plugin is an IPluginV3 and needs TensorRT >= 10.3 (JetPack >= 6.1)"
#endif

#include <cstdint>
#include <vector>

namespace medmamba_edge
{

// Identity of the plugin; must equal OP_TYPE / PLUGIN_VERSION / PLUGIN_NAMESPACE of runtime/scan_node.py
// (tests/test_plugin_build.py parses these lines).
constexpr char kPluginName[] = "SS2DScan";
constexpr char kPluginVersion[] = "2";
constexpr char kPluginNamespace[] = "medmamba_edge";

class SS2DScanPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime
{
public:
    // Inputs in node order (scan_node.INPUT_NAMES); the output y is (b, H, W, D) of x's type.
    enum Input : int32_t
    {
        kX = 0,
        kXDbl,
        kDtProjsWeight,
        kDtProjsBias,
        kA,
        kDs,
        kNbInputs
    };

    explicit SS2DScanPlugin(int32_t deltaSoftplus);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    // Attribute storage, addressed by the field table in the .cpp.
    int32_t mDeltaSoftplus{1};

private:
    std::vector<nvinfer1::PluginField> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class SS2DScanPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    SS2DScanPluginCreator();

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace medmamba_edge

extern "C"
{
    // Entry points looked up by TensorRT's plugin registry (loadLibrary, trtexec --dynamicPlugins).
    __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
        int32_t& nbCreators);
    __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
    // NV_TENSORRT_MAJOR of the headers that built this library (its virtual calls follow their class layouts).
    __attribute__((visibility("default"))) int32_t medmambaTensorRTMajor();
}

#endif // MEDMAMBA_SELECTIVE_SCAN_PLUGIN_H
