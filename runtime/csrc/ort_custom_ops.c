/*
 * libmedmamba_ort_ops: the SS2DScan node (domain medmamba_edge, contract in runtime/scan_node.py) as a native
 * ONNX Runtime custom op on the CPU execution provider.  Load it with SessionOptions.register_custom_ops_library
 * (Python), Ort::SessionOptions::RegisterCustomOpsLibrary (C++) or Triton's op_library_filename (docs/runtime.md).
 *
 * The kernel reads ONNX Runtime's input buffers and writes its output buffer in place (no copies) and runs its
 * work items on the session's intra-op thread pool (KernelContext_ParallelFor), so a session's thread count
 * is the kernel's too.  Needs ONNX Runtime >= 1.17 (C API 17: KernelContext_ParallelFor; CreateKernelV2 and
 * KernelComputeV2, which return errors as statuses, are 16); RegisterCustomOps refuses older runtimes.
 * MEDMAMBA_EDGE_SCAN_ISA forces a compiled path as for the Python extension (read when a session is created).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"
#include "selective_scan_kernel.h"

/* Built with -fvisibility=hidden: RegisterCustomOps is the library's only symbol.  A DLL exports only what is
 * marked so (ONNX Runtime's own custom-op example does the same). */
#ifdef _WIN32
#define MM_EXPORT __declspec(dllexport)
#else
#define MM_EXPORT __attribute__((visibility("default")))
#endif

#define MM_ORT_API_VERSION 17
#define MM_ORT_MIN_RELEASE "1.17"
#define MM_DOMAIN "medmamba_edge"
#define MM_OP_TYPE "SS2DScan"
#define MM_PLUGIN_VERSION "2" /* runtime/scan_node.py PLUGIN_VERSION */

typedef struct {
    const OrtApi *api;
    int delta_softplus;
    int path;
    char node[96]; /* the node's name, for messages */
} scan_kernel;

static OrtStatus *errorf(const OrtApi *api, OrtErrorCode code, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ORT_API_FN(api, CreateStatus)(code, msg);
}

#define RETURN_IF_ERROR(expr)                   \
    do {                                        \
        OrtStatus *status_ = (expr);            \
        if (status_ != NULL) return status_;    \
    } while (0)

/* Whether the node has attribute `name`, of any type: ONNX Runtime's typed getters fail alike for an absent attribute
 * and one of another type, and only the first may take the contract's default. */
static int has_attribute(const OrtApi *api, const OrtKernelInfo *info, const char *name) {
    float f;
    int64_t i;
    size_t size = 0;
    OrtStatus *probes[5] = {
        ORT_API_FN(api, KernelInfoGetAttribute_int64)(info, name, &i),
        ORT_API_FN(api, KernelInfoGetAttribute_float)(info, name, &f),
        ORT_API_FN(api, KernelInfoGetAttribute_string)(info, name, NULL, &size),
        ORT_API_FN(api, KernelInfoGetAttributeArray_float)(info, name, NULL, &size),
        ORT_API_FN(api, KernelInfoGetAttributeArray_int64)(info, name, NULL, &size),
    };
    int found = 0;
    for (int p = 0; p < 5; p++) {
        if (probes[p] == NULL)
            found = 1;
        else
            ORT_API_FN(api, ReleaseStatus)(probes[p]);
    }
    return found;
}

/* The node's plugin_version, when it has one, must be this contract's: another version's node (a newer
 * medmamba-edge's) was run as this one's, where quantize, build-engine and export-triton refuse it. */
static OrtStatus *check_plugin_version(const OrtApi *api, const OrtKernelInfo *info, const char *node) {
    char version[32];
    size_t size = 0;
    OrtStatus *status = ORT_API_FN(api, KernelInfoGetAttribute_string)(info, "plugin_version", NULL, &size);
    if (status != NULL) {
        ORT_API_FN(api, ReleaseStatus)(status);
        if (!has_attribute(api, info, "plugin_version")) return NULL; /* absent: the contract's own node */
        return errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': plugin_version must be a string ('"
                      MM_PLUGIN_VERSION "')", node);
    }
    int shown = size <= sizeof version; /* size counts the NUL */
    if (shown) {
        status = ORT_API_FN(api, KernelInfoGetAttribute_string)(info, "plugin_version", version, &size);
        if (status != NULL) return status;
        if (strcmp(version, MM_PLUGIN_VERSION) == 0) return NULL;
        /* ONNX Runtime's Python binding decodes the message as UTF-8: a byte 0xff of the attribute's made the
         * session's refusal a UnicodeDecodeError, in a traceback. */
        for (const char *c = version; *c != '\0'; c++) shown &= *c >= 0x20 && *c < 0x7f;
    }
    return errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': plugin_version '%s', but this library runs "
                  MM_OP_TYPE " of plugin version " MM_PLUGIN_VERSION "; export the model again", node,
                  shown ? version : "(a longer string, or one of other characters than printable ASCII)");
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)op;
    scan_kernel *k = calloc(1, sizeof *k);
    if (k == NULL) return errorf(api, ORT_FAIL, MM_OP_TYPE ": out of memory");
    k->api = api;
    size_t size = sizeof k->node;
    OrtStatus *status = ORT_API_FN(api, KernelInfo_GetNodeName)(info, k->node, &size);
    if (status != NULL) { /* a name longer than the buffer: messages do without it */
        ORT_API_FN(api, ReleaseStatus)(status);
        k->node[0] = '\0';
    }
    int64_t softplus = 1; /* the contract's default when the attribute is absent */
    status = ORT_API_FN(api, KernelInfoGetAttribute_int64)(info, "delta_softplus", &softplus);
    if (status != NULL) {
        ORT_API_FN(api, ReleaseStatus)(status);
        if (has_attribute(api, info, "delta_softplus")) { /* of another type */
            status = errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': delta_softplus must be an int (0 or 1)",
                            k->node);
            free(k);
            return status;
        }
        softplus = 1;
    }
    if (softplus != 0 && softplus != 1) {
        status = errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': delta_softplus must be 0 or 1, got %lld",
                        k->node, (long long)softplus);
        free(k);
        return status;
    }
    k->delta_softplus = (int)softplus;
    status = check_plugin_version(api, info, k->node);
    if (status != NULL) {
        free(k);
        return status;
    }
    char err[256];
    k->path = mm_scan_path_from_env(err, sizeof err);
    if (k->path < 0) {
        status = errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': %s", k->node, err);
        free(k);
        return status;
    }
    *out = k;
    return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }

/* Rank (up to 8 dims), shape and element type of input i. */
static OrtStatus *describe_input(const scan_kernel *k, OrtKernelContext *ctx, size_t i, const OrtValue **value,
                                 int *ndim, int64_t dims[8]) {
    const OrtApi *api = k->api;
    RETURN_IF_ERROR(ORT_API_FN(api, KernelContext_GetInput)(ctx, i, value));
    if (*value == NULL)
        return errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': input %s is missing", k->node,
                      mm_scan_input_names[i]);
    OrtTensorTypeAndShapeInfo *info = NULL;
    RETURN_IF_ERROR(ORT_API_FN(api, GetTensorTypeAndShape)(*value, &info));
    ONNXTensorElementDataType type = 0;
    size_t rank = 0;
    OrtStatus *status = ORT_API_FN(api, GetTensorElementType)(info, &type);
    if (status == NULL) status = ORT_API_FN(api, GetDimensionsCount)(info, &rank);
    if (status == NULL) status = ORT_API_FN(api, GetDimensions)(info, dims, rank < 8 ? rank : 8);
    ORT_API_FN(api, ReleaseTensorTypeAndShapeInfo)(info);
    if (status != NULL) return status;
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        return errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': %s must be float32 (ONNX type 1), got type %d",
                      k->node, mm_scan_input_names[i], (int)type);
    *ndim = (int)rank;
    return NULL;
}

/* Workers take items from the job's counter, not by index. */
static void scan_worker(void *job, size_t i) {
    (void)i;
    mm_scan_work((mm_scan_job *)job);
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const scan_kernel *k = kernel;
    const OrtApi *api = k->api;
    const OrtValue *inputs[MM_SCAN_INPUTS];
    int ndim[MM_SCAN_INPUTS];
    int64_t dims[MM_SCAN_INPUTS][8];
    const int64_t *dim_ptrs[MM_SCAN_INPUTS];
    for (size_t i = 0; i < MM_SCAN_INPUTS; i++) {
        RETURN_IF_ERROR(describe_input(k, ctx, i, &inputs[i], &ndim[i], dims[i]));
        dim_ptrs[i] = dims[i];
    }
    mm_scan_args a = {.delta_softplus = k->delta_softplus};
    char err[256];
    if (mm_scan_check_shapes(ndim, dim_ptrs, &a, err, sizeof err) != 0)
        return errorf(api, ORT_INVALID_ARGUMENT, MM_OP_TYPE " node '%s': %s", k->node, err);

    const float **in_data[MM_SCAN_INPUTS] = {&a.x, &a.x_dbl, &a.dt_w, &a.dt_b, &a.A, &a.Ds};
    for (size_t i = 0; i < MM_SCAN_INPUTS; i++) {
        /* GetTensorData (read-only) came in API 23; the mutable accessor hands out the same pointer */
        RETURN_IF_ERROR(ORT_API_FN(api, GetTensorMutableData)((OrtValue *)inputs[i], (void **)in_data[i]));
    }
    int64_t out_dims[4];
    mm_scan_output_dims(&a, out_dims);
    OrtValue *output = NULL;
    RETURN_IF_ERROR(ORT_API_FN(api, KernelContext_GetOutput)(ctx, 0, out_dims, 4, &output));
    RETURN_IF_ERROR(ORT_API_FN(api, GetTensorMutableData)(output, (void **)&a.out));

    mm_scan_job job;
    OrtStatus *status = NULL;
    /* One call per item, so the pool can give every thread work; the first call on each thread takes items until
     * none are left and the later ones return at once. */
    mm_scan_job_init(&job, &a, k->path);
    if (job.total > 0) status = ORT_API_FN(api, KernelContext_ParallelFor)(ctx, scan_worker, (size_t)job.total, 0, &job);
    if (status == NULL && mm_scan_job_status(&job) != 0)
        status = errorf(api, ORT_FAIL, MM_OP_TYPE " node '%s': out of memory for the scan's scratch buffers", k->node);
    return status;
}

static const char *op_name(const OrtCustomOp *op) {
    (void)op;
    return MM_OP_TYPE;
}

static const char *op_provider(const OrtCustomOp *op) {
    (void)op;
    return NULL; /* the CPU execution provider */
}

static ONNXTensorElementDataType op_float_type(const OrtCustomOp *op, size_t index) {
    (void)op;
    (void)index;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

static size_t op_input_count(const OrtCustomOp *op) {
    (void)op;
    return MM_SCAN_INPUTS;
}

static size_t op_output_count(const OrtCustomOp *op) {
    (void)op;
    return 1;
}

static OrtCustomOpInputOutputCharacteristic op_required(const OrtCustomOp *op, size_t index) {
    (void)op;
    (void)index;
    return INPUT_OUTPUT_REQUIRED;
}

static OrtMemType op_memory(const OrtCustomOp *op, size_t index) {
    (void)op;
    (void)index;
    return OrtMemTypeDefault;
}

/* Version 17 although only 16's members carry code: ONNX Runtime refuses an op whose version is above its own
 * API version, so this states the same floor as the ParallelFor entry the kernel calls. */
static const OrtCustomOp ss2d_scan_op = {
    .version = MM_ORT_API_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = op_float_type,
    .GetInputTypeCount = op_input_count,
    .GetOutputType = op_float_type,
    .GetOutputTypeCount = op_output_count,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = op_required,
    .GetOutputCharacteristic = op_required,
    .GetInputMemoryType = op_memory,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
};

/* One domain for the process, added to every SessionOptions that registers the library: ONNX Runtime keeps a
 * pointer to it in each session, so it must outlive them all, and it is never released (a few bytes, once: the
 * library is linked -z nodelete, so ONNX Runtime's dlclose after the last session keeps it, and this, loaded). */
static pthread_mutex_t domain_lock = PTHREAD_MUTEX_INITIALIZER;
static OrtCustomOpDomain *domain = NULL;

/* Whether ONNX Runtime `release` (its version string) has C API MM_ORT_API_VERSION: release 1.N has API N.  Asked
 * before GetApi, which in an older runtime also prints a line of its own to stderr beside the status we return. */
static int release_has_api(const char *release) {
    int major = 0, minor = 0;
    if (sscanf(release, "%d.%d", &major, &minor) != 2) return 1; /* unparsable: GetApi answers */
    return major > 1 || (major == 1 && minor >= MM_ORT_API_VERSION);
}

MM_EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base) {
    const char *release = api_base->GetVersionString();
    const OrtApi *api = release_has_api(release) ? api_base->GetApi(MM_ORT_API_VERSION) : NULL;
    if (api == NULL) /* every runtime has version 1, which is enough to say why */
        return errorf(api_base->GetApi(1), ORT_FAIL,
                      "libmedmamba_ort_ops needs ONNX Runtime >= " MM_ORT_MIN_RELEASE " (C API version %d); this is "
                      "ONNX Runtime %s",
                      MM_ORT_API_VERSION, release);
    OrtStatus *status = NULL;
    pthread_mutex_lock(&domain_lock);
    if (domain == NULL) {
        OrtCustomOpDomain *created = NULL;
        status = ORT_API_FN(api, CreateCustomOpDomain)(MM_DOMAIN, &created);
        if (status == NULL) status = ORT_API_FN(api, CustomOpDomain_Add)(created, &ss2d_scan_op);
        if (status == NULL)
            domain = created;
        else
            ORT_API_FN(api, ReleaseCustomOpDomain)(created); /* accepts NULL */
    }
    pthread_mutex_unlock(&domain_lock);
    if (status != NULL) return status;
    return ORT_API_FN(api, AddCustomOpDomain)(options, domain);
}
