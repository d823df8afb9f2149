/*
 * The part of ONNX Runtime's C ABI that libmedmamba_ort_ops uses, declared here because no package index ships
 * ONNX Runtime's headers.  The C API is append-only: OrtApiBase::GetApi(v) returns a table of function pointers
 * whose first entries never move, and a custom op's `version` tells ONNX Runtime how many OrtCustomOp members
 * to read.  So the positions below hold for every runtime from the version that introduced each entry on.
 *
 * Source of the facts (not copied, counted): include/onnxruntime/core/session/onnxruntime_c_api.h with
 * ORT_API_VERSION 24, from the tree of github.com/onnxruntime/onnxruntime-qnn at commit
 * cee6c0d91e583d43f5ecef6391e93c19b4042c0f (positions = order of the members of struct OrtApi, counted from 0;
 * "since" from its \since tags), and onnxruntime/core/session/custom_ops.cc of the same tree for the OrtCustomOp
 * version each member is read from (min_ort_version_with_* constants).
 *
 * ONNX Runtime declares every entry ORT_API_CALL: empty on POSIX, __stdcall on Windows, which 64-bit Windows
 * (x64, arm64: one calling convention each) ignores, so these plain declarations hold there too; 32-bit x86
 * Windows, where __stdcall is a convention of its own, is refused below.
 */
#ifndef MEDMAMBA_EDGE_ORT_ABI_H
#define MEDMAMBA_EDGE_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && !defined(_WIN64)
#error "32-bit Windows: ONNX Runtime's __stdcall entries are not declared here"
#endif

typedef struct OrtStatus OrtStatus;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;
typedef struct OrtApi OrtApi; /* never dereferenced as a struct: see ORT_API_FN */
typedef struct OrtCustomOp OrtCustomOp;

/* Values of the enums ONNX Runtime passes or returns (C enums are int-sized on every platform ORT supports). */
typedef enum { ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1 } ONNXTensorElementDataType;
typedef enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 } OrtErrorCode;
typedef enum { OrtMemTypeDefault = 0 } OrtMemType;
typedef enum { INPUT_OUTPUT_REQUIRED = 0 } OrtCustomOpInputOutputCharacteristic;

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version); /* NULL if the runtime is older than `version` */
    const char *(*GetVersionString)(void);
} OrtApiBase;

/* ---- OrtApi: position in the table, API version (= ONNX Runtime 1.<version>) it appeared in, and type. ---- */
/* The table is only function pointers, so entry i lies i pointers in. */
#define ORT_API_FN(api, name) ((name##_fn)(((void (*const *)(void))(const void *)(api))[ORT_API_POS_##name]))

#define ORT_API_POS_CreateStatus 0 /* since 1 */
typedef OrtStatus *(*CreateStatus_fn)(OrtErrorCode code, const char *msg);
#define ORT_API_POS_CreateCustomOpDomain 26 /* since 1 */
typedef OrtStatus *(*CreateCustomOpDomain_fn)(const char *domain, OrtCustomOpDomain **out);
#define ORT_API_POS_CustomOpDomain_Add 27 /* since 1 */
typedef OrtStatus *(*CustomOpDomain_Add_fn)(OrtCustomOpDomain *domain, const OrtCustomOp *op);
#define ORT_API_POS_AddCustomOpDomain 28 /* since 1 */
typedef OrtStatus *(*AddCustomOpDomain_fn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
#define ORT_API_POS_GetTensorMutableData 51 /* since 1 */
typedef OrtStatus *(*GetTensorMutableData_fn)(OrtValue *value, void **out);
#define ORT_API_POS_GetTensorElementType 60 /* since 1 */
typedef OrtStatus *(*GetTensorElementType_fn)(const OrtTensorTypeAndShapeInfo *info,
                                                          ONNXTensorElementDataType *out);
#define ORT_API_POS_GetDimensionsCount 61 /* since 1 */
typedef OrtStatus *(*GetDimensionsCount_fn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
#define ORT_API_POS_GetDimensions 62 /* since 1; copies min(length, rank) dims */
typedef OrtStatus *(*GetDimensions_fn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims,
                                                   size_t length);
#define ORT_API_POS_GetTensorTypeAndShape 65 /* since 1 */
typedef OrtStatus *(*GetTensorTypeAndShape_fn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
#define ORT_API_POS_KernelInfoGetAttribute_float 85 /* since 1 */
typedef OrtStatus *(*KernelInfoGetAttribute_float_fn)(const OrtKernelInfo *info, const char *name, float *out);
#define ORT_API_POS_KernelInfoGetAttribute_int64 86 /* since 1 */
typedef OrtStatus *(*KernelInfoGetAttribute_int64_fn)(const OrtKernelInfo *info, const char *name,
                                                                  int64_t *out);
#define ORT_API_POS_KernelInfoGetAttribute_string 87 /* since 1; out NULL: only *size (bytes with the NUL) */
typedef OrtStatus *(*KernelInfoGetAttribute_string_fn)(const OrtKernelInfo *info, const char *name, char *out,
                                                       size_t *size);
#define ORT_API_POS_KernelContext_GetInput 90 /* since 1; *out is NULL for an absent optional input */
typedef OrtStatus *(*KernelContext_GetInput_fn)(const OrtKernelContext *ctx, size_t index,
                                                            const OrtValue **out);
#define ORT_API_POS_KernelContext_GetOutput 91 /* since 1 */
typedef OrtStatus *(*KernelContext_GetOutput_fn)(OrtKernelContext *ctx, size_t index,
                                                             const int64_t *dims, size_t rank, OrtValue **out);
#define ORT_API_POS_ReleaseStatus 93 /* since 1 */
typedef void(*ReleaseStatus_fn)(OrtStatus *status);
#define ORT_API_POS_ReleaseTensorTypeAndShapeInfo 99 /* since 1 */
typedef void(*ReleaseTensorTypeAndShapeInfo_fn)(OrtTensorTypeAndShapeInfo *info);
#define ORT_API_POS_ReleaseCustomOpDomain 101 /* since 1 */
typedef void(*ReleaseCustomOpDomain_fn)(OrtCustomOpDomain *domain);
/* The array getters: no \since tag; they precede entry 244, which came with 15.  out NULL: only *size. */
#define ORT_API_POS_KernelInfoGetAttributeArray_float 162
typedef OrtStatus *(*KernelInfoGetAttributeArray_float_fn)(const OrtKernelInfo *info, const char *name, float *out,
                                                           size_t *size);
#define ORT_API_POS_KernelInfoGetAttributeArray_int64 163
typedef OrtStatus *(*KernelInfoGetAttributeArray_int64_fn)(const OrtKernelInfo *info, const char *name, int64_t *out,
                                                           size_t *size);
#define ORT_API_POS_KernelInfo_GetNodeName 244 /* since 15; size in: buffer bytes, out: bytes needed */
typedef OrtStatus *(*KernelInfo_GetNodeName_fn)(const OrtKernelInfo *info, char *out, size_t *size);
#define ORT_API_POS_KernelContext_ParallelFor 274 /* since 17; fn(usr_data, i) for i < total on the intra-op pool */
typedef OrtStatus *(*KernelContext_ParallelFor_fn)(const OrtKernelContext *ctx,
                                                               void (*fn)(void *usr_data, size_t i), size_t total,
                                                               size_t num_batch, void *usr_data);

/* ---- OrtCustomOp, members up to version 17; ONNX Runtime reads only those up to the `version` we set. ---- */
struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op); /* NULL: CPU */
    ONNXTensorElementDataType(*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t(*GetInputTypeCount)(const struct OrtCustomOp *op);
    ONNXTensorElementDataType(*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t(*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void(*KernelCompute)(void *kernel, OrtKernelContext *ctx);
    void(*KernelDestroy)(void *kernel);
    /* version 8 */
    OrtCustomOpInputOutputCharacteristic(*GetInputCharacteristic)(const struct OrtCustomOp *op,
                                                                               size_t index);
    OrtCustomOpInputOutputCharacteristic(*GetOutputCharacteristic)(const struct OrtCustomOp *op,
                                                                                size_t index);
    /* version 13: called for every input, must not be NULL */
    OrtMemType(*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
    /* version 14: called only for variadic inputs/outputs */
    int(*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
    int(*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int(*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int(*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    /* version 16: used instead of CreateKernel/KernelCompute when set; errors come back as statuses */
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api,
                                             const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
    /* version 17: each may be NULL */
    OrtStatus *(*InferOutputShapeFn)(const struct OrtCustomOp *op, OrtShapeInferContext *ctx);
    int(*GetStartVersion)(const struct OrtCustomOp *op);
    int(*GetEndVersion)(const struct OrtCustomOp *op);
};

#endif
