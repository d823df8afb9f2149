"""The JSON manifest beside every TensorRT engine (``model.engine.json``) and the engine cache's keys.

A serialized engine only runs on the TensorRT version and GPU it was built for (unless built
version-/hardware-compatible), in a machine of the CPU architecture it was built in, and carries no model
metadata. The manifest records what it was built from and for: TensorRT version, GPU, CPU architecture,
precision, profile shapes, sha256 of the ONNX file and the plugin library, the build options, and the model's
``ModelMetadata``. The runtime reads it (torch- and TensorRT-free) to
preprocess inputs and to refuse a mismatched engine with the exact command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medmamba_edge import __version__
from medmamba_edge.errors import UserError

from ...files import write_bytes_atomically
from ...metadata import ModelMetadata
from .compat import GpuInfo, parse_version

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".json"
AMPERE = (8, 0)
AMPERE_OR_NEWER = "an Ampere or newer GPU"  # where a --hardware-compat engine runs


NO_DLA = -1  # --dla-core -1: GPU only, whatever the preset says


@dataclass(frozen=True)
class Preset:
    workspace_mib: int | None  # None: TensorRT's default (the whole device memory)
    opt_level: int
    dla_core: int | None  # used for FP16/INT8 builds only: DLA has no FP32
    description: str


# Jetson memory is shared by CPU and GPU, so the workspace is capped well below the board's RAM. Orin
# boards keep optimisation level 3 (TensorRT's default) because the build runs on their ARM cores; Thor and
# desktop GPUs can afford level 4's wider tactic search. AGX Orin and Orin NX 16GB have 2 DLA cores, Orin NX 8GB
# one (core 0 on each); Orin Nano has none, and Thor's are not usable for this model.
PRESETS = {
    "orin-nano": Preset(1024, 3, None, "Jetson Orin Nano (4/8 GB, no DLA)"),
    "orin-nx": Preset(2048, 3, 0, "Jetson Orin NX (8/16 GB, DLA core 0 with GPU fallback)"),
    "agx-orin": Preset(4096, 3, 0, "Jetson AGX Orin (32/64 GB, DLA core 0 with GPU fallback)"),
    "thor": Preset(8192, 4, None, "Jetson Thor (128 GB)"),
    "dgpu": Preset(None, 4, None, "desktop / data-centre GPU"),
}


class EngineManifestError(UserError):
    """A manifest that is missing, unreadable, or does not match this machine."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything `build-engine` can be told, after presets are resolved. ``None``: TensorRT's default."""

    fp16: bool = False
    int8: bool = False  # the ONNX model carries explicit Q/DQ nodes (`medmamba-edge quantize`)
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    workspace_mib: int | None = None
    opt_level: int | None = None
    dla_core: int | None = None
    version_compatible: bool = False
    hardware_compat: bool = False
    timing_cache: str | None = None
    preset: str | None = None
    dla_from_preset: bool = False  # dla_core is the preset's pick, not the user's: dropped where there is no DLA

    # None changes the engine's meaning: a timing cache only speeds up tactic selection, and a preset is
    # already expanded into the fields above.
    NOT_IN_CACHE_KEY = ("timing_cache", "preset", "dla_from_preset")
    # Used by the build only, and not written to manifests: readers before it reject unknown build fields.
    NOT_IN_MANIFEST = ("dla_from_preset",)

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    def cli_args(self) -> list[str]:
        """The `build-engine` options that reproduce these: the preset, and the values that differ from its. The
        preset's DLA core is left to the preset, which drops it where there is no DLA (spelled out, the command an
        engine's mismatch prints failed on the device that printed it)."""
        args = [flag for flag, on in (("--fp16", self.fp16), ("--int8", self.int8),
                                      ("--version-compatible", self.version_compatible),
                                      ("--hardware-compat", self.hardware_compat)) if on]
        preset = PRESETS.get(self.preset)
        if preset:
            args += ["--preset", self.preset]
        defaults = dict(workspace_mib=preset.workspace_mib, opt_level=preset.opt_level,
                        dla_core=preset.dla_core if self.fp16 or self.int8 else None) if preset else {}
        given = asdict(self)
        if self.dla_core is None and defaults.get("dla_core") is not None:  # GPU only where the preset picks a DLA
            given["dla_core"] = NO_DLA
        for name, flag in (("min_batch", "--min-batch"), ("opt_batch", "--opt-batch"), ("max_batch", "--max-batch"),
                           ("workspace_mib", "--workspace"), ("opt_level", "--opt-level"), ("dla_core", "--dla-core"),
                           ("timing_cache", "--timing-cache")):
            if given[name] is not None and (name not in defaults or given[name] != defaults[name]):
                args += [flag, str(given[name])]
        return args

    def key_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.NOT_IN_CACHE_KEY}


@dataclass(frozen=True)
class EngineManifest:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict  # {input name: {"min": [...], "opt": [...], "max": [...]}}
    onnx_path: str
    onnx_sha256: str
    plugin_sha256: str | None  # None: the graph has no SS2DScan node
    build: BuildOptions
    metadata: ModelMetadata
    fp16_graph: bool = False  # the ONNX was converted to float16 before parsing (strongly typed TensorRT)
    tool_version: str = ""
    manifest_version: int = MANIFEST_VERSION
    gpu_multiprocessors: int | None = None  # GpuInfo.multiprocessors
    # platform.machine() of the build ("x86_64", "aarch64"): a plan runs only on the operating system and CPU
    # architecture it was built on (TensorRT's RuntimePlatform::kSAME_AS_BUILD), hardware-compatible or not.
    # None: not recorded (manifests written before it was).
    cpu_architecture: str | None = None

    @property
    def gpu(self) -> GpuInfo:
        return GpuInfo(self.gpu_name, self.compute_capability, self.gpu_multiprocessors)

    @property
    def carries_plugin(self) -> bool:
        """Whether the plan holds the SS2DScan plugin library itself: build-engine serialises it into a
        version-compatible plan, whose lean runtime loads it from there, so whoever runs the plan registers none
        (the one built where it runs, if any, may be for another TensorRT major version than the plan's)."""
        return self.plugin_sha256 is not None and self.build.version_compatible

    @property
    def runs_on(self) -> str:
        """The TensorRT versions, GPUs and machines check_manifest accepts for this engine, in words."""
        versions = " and later versions (its plan carries TensorRT's lean runtime)" if self.build.version_compatible else ""
        gpus = AMPERE_OR_NEWER if self.build.hardware_compat else f"the GPU it was built on, {self.gpu}"
        machine = f" in an {self.cpu_architecture} machine" if self.cpu_architecture else ""
        return f"TensorRT {self.tensorrt_version}{versions}, on {gpus}{machine}"

    def to_json(self) -> str:
        data = asdict(self)
        for name in BuildOptions.NOT_IN_MANIFEST:
            del data["build"][name]
        data["metadata"] = json.loads(self.metadata.to_json())
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> EngineManifest:
        try:
            data = json.loads(text)
            if data.get("manifest_version", 0) > MANIFEST_VERSION:
                raise EngineManifestError(f"{source}: manifest version {data['manifest_version']} is newer than this "
                                          f"medmamba-edge understands; upgrade medmamba-edge")
            known = {f.name for f in fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            # Fields a later version added are left out, as unknown top-level keys are.
            data["build"] = BuildOptions(**{k: v for k, v in data["build"].items()
                                            if k in {f.name for f in fields(BuildOptions)}})
            data["metadata"] = ModelMetadata.from_json(json.dumps(data["metadata"]), source)
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise EngineManifestError(f"{source}: not a valid engine manifest ({type(exc).__name__}: {exc})") from None


def manifest_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + MANIFEST_SUFFIX)


def write_manifest(engine: str | Path, manifest: EngineManifest) -> Path:
    path = manifest_path(engine)
    write_bytes_atomically(path, manifest.to_json().encode())
    return path


def read_manifest(engine: str | Path) -> EngineManifest:
    path = manifest_path(engine)
    if not path.is_file():
        raise EngineManifestError(
            f"{engine}: no manifest ({path.name}) beside it; build engines with `medmamba-edge build-engine`, "
            "which writes one (it carries the model's preprocessing and class names)"
        )
    return EngineManifest.from_json(path.read_text(), str(path))


def rebuild_command(manifest: EngineManifest, engine: str | Path) -> str:
    return shlex.join(["medmamba-edge", "build-engine", manifest.onnx_path, "-o", str(engine),
                       *manifest.build.cli_args()])


def _cc(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def check_manifest(manifest: EngineManifest, engine: str | Path, tensorrt_version: str, gpu: GpuInfo,
                   dla_cores: int | None = None, cpu_architecture: str | None = None) -> None:
    """Raise EngineManifestError unless the engine can run on this TensorRT and GPU (and, given the device's
    ``dla_cores``, its DLA core: an Orin NX's engine on DLA core 0 passes the GPU check on an Orin Nano 8GB, whose
    GPU is the same and whose DLA is fused off; given this machine's ``cpu_architecture``, that too: a
    hardware-compatible engine from an x86_64 desktop passes the GPU check on a Jetson Orin)."""
    built, running = parse_version(manifest.tensorrt_version), parse_version(tensorrt_version)
    if manifest.build.version_compatible:
        # A version-compatible plan carries its lean runtime: it runs on the same or a later TensorRT.
        version_ok = running >= built
    else:
        version_ok = running == built
    if manifest.build.hardware_compat:
        gpu_ok = _cc(gpu.compute_capability) >= AMPERE
    else:
        built_on = manifest.gpu
        gpu_ok = ((gpu.name, gpu.compute_capability) == (built_on.name, built_on.compute_capability)
                  and built_on.multiprocessors in (None, gpu.multiprocessors))
    dla_core = manifest.build.dla_core
    dla_ok = dla_core is None or dla_cores is None or dla_core < dla_cores
    platform_ok = None in (manifest.cpu_architecture, cpu_architecture) or manifest.cpu_architecture == cpu_architecture
    if version_ok and gpu_ok and dla_ok and platform_ok:
        return
    problems = []
    if not version_ok:
        problems.append(f"built with TensorRT {manifest.tensorrt_version}, running {tensorrt_version}")
    if not platform_ok:
        problems.append(f"built on an {manifest.cpu_architecture} machine, running on {cpu_architecture}")
    if not gpu_ok:
        wanted = AMPERE_OR_NEWER if manifest.build.hardware_compat else manifest.gpu
        problems.append(f"built for {wanted}, running on {gpu}")
    if not dla_ok:
        problems.append(f"built for DLA core {dla_core}, and this device has {dla_cores} DLA cores")
    raise EngineManifestError(
        f"{engine} does not match this machine ({'; '.join(problems)}); rebuild it: {rebuild_command(manifest, engine)}"
    )


def engine_cache_key(onnx_sha256: str, options: BuildOptions, tensorrt_version: str, gpu: GpuInfo,
                     plugin_sha256: str | None) -> str:
    """Stable over runs; changes with the model, precision, TensorRT version, GPU, CPU architecture, plugin build,
    any option that changes the engine, or medmamba-edge's version (its graph conversion and build recipe make the
    engine too)."""
    identity = {
        "onnx": onnx_sha256,
        "tensorrt": tensorrt_version,
        "gpu": [gpu.name, gpu.compute_capability, gpu.multiprocessors],
        "cpu": platform.machine(),  # a home shared by an x86_64 and an aarch64 server with the same GPU
        "tool": __version__,
        "plugin": plugin_sha256,
        "options": options.key_fields(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
