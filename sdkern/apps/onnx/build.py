"""``sdkern optimize``: export, fuse, convert and cache a diffusers-style ONNX pipeline directory.

Stages per component (text_encoder, unet, vae_decoder, vae_encoder; SDXL adds text_encoder_2; a pipeline
with a ControlNet adds controlnet, ``safety_checker=True`` the safety checker; see :mod:`sdkern.onnx.export`):

1. export (TorchScript exporter, checked with onnx.checker), after merging a LoRA when given;
2. ONNX Runtime's transformer optimiser (model_type clip / unet / vae) with per-target fusions:

   - ``cpu``: every fusion except NhwcConv (CUDA-only); then :func:`sdkern.onnx.convert_contrib`
     moves GroupNorm / SkipGroupNorm / BiasSplitGelu / BiasAdd (and MultiHeadAttention for fp16)
     to the ``sdkern`` domain, which sdkern's custom-op library runs on the CPU execution provider;
   - ``cuda``: ORT's own com.microsoft CUDA kernels, NHWC convolutions included;
   - ``dml``: only what DirectML implements (NCHW GroupNorm, MultiHeadAttention with packed QKV/KV),
     fp16 — no NhwcConv, BiasSplitGelu, BiasAdd or SkipLayerNormalization;
3. fp16 conversion (``fp16=True``) keeping GroupNorm gamma/beta and random-normal ops in fp32, plus
   ``force_fp32_ops``;
4. the directory: ``model_index.json``, one folder per component (``model.onnx``, external data past
   2 GB), tokenizer and scheduler configs, and ``sdkern_manifest.json`` (source hash, options,
   versions, fused-node counts).

A cache keyed by (source hash, options, versions) makes a repeated run a copy. Every write goes to a
temporary directory that is renamed into place at the end, so an interrupted run leaves no
half-written model, in the cache or at ``out``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdkern._version import __version__
from sdkern.apps.onnx.export import components_of, export_component, is_sdxl

logger = logging.getLogger("sdkern")

TARGETS = ("cpu", "cuda", "dml")
MODEL_TYPES = {
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
    "controlnet": "unet",  # a U-Net's down and mid blocks: the same fusions apply
    "safety_checker": "clip",  # a CLIP vision transformer and two projections
}
FUSED_OPS = (
    "GroupNorm",
    "SkipGroupNorm",
    "BiasSplitGelu",
    "BiasAdd",
    "MultiHeadAttention",
    "Attention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "NhwcConv",
    "BiasGelu",
    "FastGelu",
    "Gelu",
)


def default_cache_dir() -> Path:
    root = os.environ.get("SDKERN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sdkern"
    )
    return Path(root) / "onnx"


#: Config keys that describe how a config was loaded, not the model: ``_use_default_values`` is a list whose
#: order follows set iteration (PYTHONHASHSEED), ``_name_or_path`` where it was loaded from.
_NON_MODEL_CONFIG_KEYS = ("_use_default_values", "_name_or_path")


def canonical_config(cfg: Any) -> str:
    """A component's config as canonical JSON: the same text for the same model in every process.

    Keys sorted, :data:`_NON_MODEL_CONFIG_KEYS` left out, tuples as lists, other non-JSON values as ``str``.
    """
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    d = {k: v for k, v in d.items() if k not in _NON_MODEL_CONFIG_KEYS}
    return json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))


def source_hash(pipe: Any, safety_checker: bool = False) -> str:
    """SHA-256 over every parameter and buffer of the exported components (names, dtypes, bytes)."""
    h = hashlib.sha256()
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae", "controlnet", "safety_checker"):
        if comp == "safety_checker" and not safety_checker:
            continue
        mod = getattr(pipe, comp, None)
        if mod is None:
            continue
        h.update(canonical_config(getattr(mod, "config", None)).encode())
        for name, t in sorted(mod.state_dict().items()):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "sdkern": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


#: com.microsoft ops ORT's optimiser emits that the CPU execution provider has no kernel for (checked
#: with onnxruntime 1.32 by creating CPU sessions: "Could not find an implementation for GroupNorm(1)",
#: likewise SkipGroupNorm, BiasSplitGelu, BiasAdd; NhwcConv is CUDA-only). SkipLayerNormalization,
#: LayerNormalization, Attention, MultiHeadAttention (unpacked QKV) and the Gelu family do run on the CPU
#: EP. In fp16 the CPU EP has no kernel for Conv, MatMul and Gemm: ORT inserts
#: Casts and runs them in fp32 (seen in the session-optimised graph).
CPU_EP_MISSING = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv")


def _fusion_options(model_type: str, target: str, fp16: bool, sdkern_ops: bool = True) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions

    fo = FusionOptions(model_type)
    if model_type == "unet":
        fo.enable_packed_kv = fp16
        fo.enable_packed_qkv = fp16
        fo.enable_bias_add = True
    if target != "cuda":
        fo.enable_nhwc_conv = False
    if target == "cpu" and not sdkern_ops:
        # ORT alone on the CPU EP: only the fusions it has CPU kernels for (see CPU_EP_MISSING)
        fo.enable_group_norm = False
        fo.enable_skip_group_norm = False
        fo.enable_bias_splitgelu = False
        fo.enable_bias_add = False
        # ORT's CPU MultiHeadAttention rejects packed QKV / KV ("Packed QKV of shape (B, L, N, 3, H) not
        # implemented for CPU"); fp16 runs there through Casts to fp32 that ORT inserts
        fo.enable_packed_qkv = False
        fo.enable_packed_kv = False
    if target == "dml":
        fo.enable_bias_splitgelu = False
        fo.enable_bias_add = False
        fo.enable_skip_layer_norm = False
        fo.enable_bias_skip_layer_norm = False
        fo.enable_skip_group_norm = False
        fo.group_norm_channels_last = False
    return fo


def optimize_component(
    src: Path,
    dst: Path,
    component: str,
    target: str,
    fp16: bool,
    force_fp32_ops: tuple[str, ...] = (),
    sdkern_ops: bool = True,
) -> dict[str, int]:
    """Optimise one exported model into ``dst``; returns op-type counts of the result.

    Parameters
    ----------
    src, dst : Path
        Exported model and where to write the optimised one (checked with onnx.checker).
    component : str
        One of :data:`sdkern.onnx.export.SDXL_COMPONENTS` (selects ORT's model type).
    target : {"cpu", "cuda", "dml"}
        Execution provider the model is for.
    fp16 : bool
        Convert to float16.
    force_fp32_ops : tuple of str
        Extra op types kept in float32.
    sdkern_ops : bool
        ``target="cpu"`` only: True (default) fuses everything and moves the ops the CPU EP lacks to
        sdkern's custom-op domain; False keeps to ONNX Runtime alone (no fusion into
        :data:`CPU_EP_MISSING` ops, no sdkern library needed).

    Returns
    -------
    dict[str, int]
        Op-type counts of the written model.
    """
    import onnx
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.optimizer import optimize_model

    from sdkern.apps.onnx._ort_compat import patched_fusions

    model_type = MODEL_TYPES[component]
    with patched_fusions():
        m = optimize_model(
            str(src),
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=_fusion_options(model_type, target, fp16, sdkern_ops),
            use_gpu=target != "cpu",
        )
    if fp16:
        block = [*float16.DEFAULT_OP_BLOCK_LIST, "RandomNormalLike", "RandomNormal", *force_fp32_ops]
        keep: bool | list[str] = False
        nodes: list[str] = []
        if component in ("unet", "controlnet"):
            # The sinusoidal timestep embedding stays float32, as in diffusers (Timesteps computes in
            # fp32 and casts after): sin/cos of t * freq with t up to 999 in fp16 is off by up to ~0.5 rad
            # (measured: tiny U-Net relative error vs float64 5.4e-3 with it in fp16, see tests/onnx).
            # SDXL's added time ids (image sizes, up to 1024 and more) go through the same sinusoidal
            # embedding (add_time_proj): kept float32 likewise.
            inputs = {i.name for i in m.model.graph.input}
            keep = [n for n in ("timestep", "time_ids") if n in inputs]
            nodes = [
                n.name
                for n in m.model.graph.node
                if "/time_proj/" in n.name or "/add_time_proj/" in n.name or set(keep) & set(n.input)
            ]
        m.convert_float_to_float16(keep_io_types=keep, op_block_list=block, node_block_list=nodes)
        m.topological_sort()  # the converter appends Cast nodes out of order
    model = m.model
    _ensure_opset_imports(model)
    if target == "cpu" and sdkern_ops:
        from sdkern.apps.onnx.convert import convert_contrib

        ops = ["GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"]
        if fp16:
            ops.append("MultiHeadAttention")  # ORT's CPU MultiHeadAttention is fp32-only
        model = convert_contrib(model, ops=ops)
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = _past_protobuf_limit(model)
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location="model.onnx.data" if big else None,
    )
    onnx.checker.check_model(str(dst))
    return dict(Counter(n.op_type for n in model.graph.node))


def _past_protobuf_limit(model: Any) -> bool:
    """Whether ``model`` must be saved with external data (protobuf messages stop at 2 GB).

    ``ByteSize()`` itself raises ``EncodeError`` past 2 GB (seen with the fp32 SD1.5 U-Net, 3.4 GB), so a
    failure to size the message means "too big" too.
    """
    try:
        return model.ByteSize() > 1_900_000_000
    except Exception:  # noqa: BLE001 - google.protobuf.message.EncodeError, or no ByteSize at all
        return True


def _ensure_opset_imports(model: Any) -> None:
    """The optimiser adds contrib-domain nodes without their opset import until it saves: add it."""
    import onnx

    have = {o.domain for o in model.opset_import}
    for domain in {n.domain for n in model.graph.node} - have - {"", "ai.onnx"}:
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def _merge_lora(pipe: Any, lora: str | None, lora_scale: float) -> str | None:
    if lora is None:
        return None
    from sdkern import lora as lora_mod

    lora_mod.load(pipe, lora, adapter_name="optimize", scale=lora_scale, fuse=True)
    with open(lora, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _config_dict(module: Any) -> dict[str, Any]:
    cfg = module.config
    return json.loads(cfg.to_json_string()) if hasattr(cfg, "to_json_string") else json.loads(json.dumps(dict(cfg)))


def _write_sdxl_pipeline_files(pipe: Any, root: Path) -> None:
    """The files of an SDXL directory besides the models, in the layout of optimum's ONNX SDXL pipelines.

    ``model_index.json`` names the class ``OnnxStableDiffusionXLPipeline`` (which diffusers does not
    have: load with :class:`sdkern.onnx.OrtStableDiffusionPipeline`); each component folder holds its
    source module's full ``config.json`` (the ORT stand-ins of :mod:`sdkern.onnx.sdxl` mirror it).
    """
    import diffusers

    index = {
        "_class_name": _class_name(pipe, "OnnxStableDiffusionXL"),
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "text_encoder": ["diffusers", "OnnxRuntimeModel"],
        "text_encoder_2": ["diffusers", "OnnxRuntimeModel"],
        "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
        "tokenizer_2": ["transformers", type(pipe.tokenizer_2).__name__],
        "unet": ["diffusers", "OnnxRuntimeModel"],
        "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
        "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
        **_optional_entries(pipe, root),
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_scheduler(pipe, root)
    pipe.tokenizer.save_pretrained(str(root / "tokenizer"))
    pipe.tokenizer_2.save_pretrained(str(root / "tokenizer_2"))
    configs = {
        "text_encoder": _config_dict(pipe.text_encoder),
        "text_encoder_2": _config_dict(pipe.text_encoder_2),
        "unet": _config_dict(pipe.unet),
        "vae_decoder": _config_dict(pipe.vae),
        "vae_encoder": _config_dict(pipe.vae),
    }
    configs.update(_optional_configs(pipe, root))
    for comp, cfg in configs.items():
        if (root / comp).is_dir():
            (root / comp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_scheduler(pipe: Any, root: Path) -> None:
    pipe.scheduler.save_pretrained(str(root / "scheduler"))
    # Keys the source scheduler took as class defaults are left out, as in the source: a scheduler
    # built from this config with another class (``sdkern generate --scheduler``) then takes that
    # class's defaults (e.g. timestep_spacing) exactly as on the torch path.
    defaults = set(pipe.scheduler.config.get("_use_default_values", []))
    if defaults:
        cfg_file = root / "scheduler" / "scheduler_config.json"
        cfg = {k: v for k, v in json.loads(cfg_file.read_text()).items() if k not in defaults}
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_pipeline_files(pipe: Any, root: Path) -> None:
    import diffusers

    if is_sdxl(pipe):
        _write_sdxl_pipeline_files(pipe, root)
        return

    index = {
        "_class_name": _class_name(pipe, "OnnxStableDiffusion"),
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "text_encoder": ["diffusers", "OnnxRuntimeModel"],
        "tokenizer": ["transformers", type(pipe.tokenizer).__name__] if pipe.tokenizer is not None else [None, None],
        "unet": ["diffusers", "OnnxRuntimeModel"],
        "vae_decoder": ["diffusers", "OnnxRuntimeModel"],
        "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
        **_optional_entries(pipe, root),
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_scheduler(pipe, root)
    if pipe.tokenizer is not None:
        pipe.tokenizer.save_pretrained(str(root / "tokenizer"))
    # Each component folder holds its source module's full config.json: diffusers' ONNX pipeline reads the
    # VAE's scaling factor and channels from vae_decoder/config.json, ``sdkern generate --onnx`` the U-Net's
    # native latent size, and the ORT stand-ins of :mod:`sdkern.onnx.sdxl` (CUDA EP, IO binding) mirror all.
    configs = {"vae_decoder": pipe.vae, "vae_encoder": pipe.vae, "unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for comp, module in configs.items():
        if module is not None and (root / comp).is_dir():
            (root / comp / "config.json").write_text(json.dumps(_config_dict(module), indent=2, sort_keys=True) + "\n")
    for comp, cfg in _optional_configs(pipe, root).items():
        (root / comp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _class_name(pipe: Any, prefix: str) -> str:
    """``model_index.json``'s class: ``<prefix>[Inpaint|ControlNet]Pipeline`` after the U-Net and ControlNet.

    SD's txt2img and inpainting names are diffusers' ONNX pipelines; the others name no diffusers class
    (load every kind with :class:`sdkern.onnx.OrtStableDiffusionPipeline`).
    """
    if getattr(pipe, "controlnet", None) is not None:
        return f"{prefix}ControlNetPipeline"
    if pipe.unet.config.in_channels == 9:  # latents, mask, masked-image latents
        return f"{prefix}InpaintPipeline"
    return f"{prefix}Pipeline"


def _optional_entries(pipe: Any, root: Path) -> dict[str, Any]:
    """``model_index.json`` entries of the exported optional components (and the safety checker's image
    processor, saved to ``root/feature_extractor``); ``[None, None]`` for a standard one not exported
    (``components=`` without it)."""
    entries: dict[str, Any] = {
        comp: [None, None]
        for comp in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
        if not (root / comp).is_dir() and (comp != "text_encoder_2" or is_sdxl(pipe))
    }
    if (root / "controlnet").is_dir():
        entries["controlnet"] = ["diffusers", "OnnxRuntimeModel"]
    if (root / "safety_checker").is_dir():
        fe = pipe.feature_extractor
        if fe is None:
            raise ValueError("the safety checker needs the pipeline's feature_extractor (its image processor)")
        fe.save_pretrained(str(root / "feature_extractor"))
        entries["safety_checker"] = ["diffusers", "OnnxRuntimeModel"]
        entries["feature_extractor"] = ["transformers", type(fe).__name__]
        entries["requires_safety_checker"] = True
    return entries


def _optional_configs(pipe: Any, root: Path) -> dict[str, dict[str, Any]]:
    """The source configs of the exported optional components, by component folder."""
    configs: dict[str, dict[str, Any]] = {}
    if (root / "controlnet").is_dir():
        configs["controlnet"] = _config_dict(pipe.controlnet)
    if (root / "safety_checker").is_dir():
        configs["safety_checker"] = pipe.safety_checker.config.to_dict()
    return configs


def optimize_pipeline(
    pipe: Any,
    out: str | os.PathLike[str],
    *,
    target: str = "cpu",
    fp16: bool = False,
    force_fp32_ops: tuple[str, ...] = (),
    lora: str | None = None,
    lora_scale: float = 1.0,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    components: tuple[str, ...] | None = None,
    safety_checker: bool = False,
) -> dict[str, Any]:
    """Export + optimise ``pipe`` into the ONNX pipeline directory ``out``.

    Parameters
    ----------
    pipe : diffusers.StableDiffusionPipeline or diffusers.StableDiffusionXLPipeline
        The source (SD 1.x / 2.x or SDXL architectures).
    out : path
        Output directory; must not exist unless ``overwrite``.
    target : {"cpu", "cuda", "dml"}
    fp16 : bool
        Convert to float16 (GroupNorm gamma/beta and random ops stay float32).
    force_fp32_ops : tuple of str
        Extra op types to keep in float32.
    lora, lora_scale
        A LoRA safetensors file merged into the weights before export.
    cache_dir, use_cache
        Where finished directories are cached (default ``~/.cache/sdkern/onnx``) and whether to use it.
    overwrite : bool
        Replace an existing ``out``.
    progress : callable, optional
        Receives one line per stage.
    components : tuple of str, optional
        Components to export; default every one of the pipeline (:func:`sdkern.onnx.export.components_of`:
        with ``controlnet`` when the pipeline has a ControlNet).
    safety_checker : bool
        Also export and optimise ``pipe.safety_checker`` (with its image processor), as Olive's SD example
        does; a ValueError when the pipeline has none.

    Returns
    -------
    dict
        The manifest (also written to ``out/sdkern_manifest.json``), with ``"cache": "hit"|"miss"``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "dml" and not fp16:
        logger.info("sdkern optimize: DirectML target: converting to fp16")
        fp16 = True
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    say = progress or (lambda msg: logger.info("sdkern optimize: %s", msg))
    if components is None:
        components = components_of(pipe, safety_checker=safety_checker)
    safety_checker = "safety_checker" in components
    t_start = time.perf_counter()

    say("hashing the source weights")
    lora_hash = _merge_lora(pipe, lora, lora_scale)
    options = {
        "target": target,
        "fp16": fp16,
        "force_fp32_ops": sorted(force_fp32_ops),
        "lora_sha256": lora_hash,
        "lora_scale": lora_scale if lora else None,
        "components": list(components),
    }
    src_hash = source_hash(pipe, safety_checker=safety_checker)
    key_doc = {"source": src_hash, "options": options, "versions": _versions()}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_root / key

    if use_cache and (cached / "sdkern_manifest.json").is_file():
        say(f"cache hit {cached}: copying")
        manifest = json.loads((cached / "sdkern_manifest.json").read_text())
        _atomic_copy(cached, out, overwrite)
        return {**manifest, "cache": "hit", "seconds": time.perf_counter() - t_start}

    fused: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="sdkern-onnx-") as tmp:
        tmp_path = Path(tmp)
        build = tmp_path / "build"
        for i, comp in enumerate(components, 1):
            say(f"[{i}/{len(components)}] {comp}: export")
            raw = export_component(pipe, comp, tmp_path / "raw" / comp / "model.onnx")
            say(f"[{i}/{len(components)}] {comp}: optimise for {target}{' fp16' if fp16 else ''}")
            counts = optimize_component(raw, build / comp / "model.onnx", comp, target, fp16, tuple(force_fp32_ops))
            fused[comp] = {k: v for k, v in sorted(counts.items()) if k in FUSED_OPS}
            shutil.rmtree(tmp_path / "raw" / comp)
        _write_pipeline_files(pipe, build)
        manifest = {
            "format": 1,
            "source_sha256": src_hash,
            "key": key,
            "options": options,
            "versions": key_doc["versions"],
            "fused_nodes": fused,
        }
        (build / "sdkern_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if use_cache:
            _atomic_copy(build, cached, overwrite=True)
        _atomic_move_or_copy(build, out, overwrite)
    say(f"done in {time.perf_counter() - t_start:.1f} s -> {out}")
    return {**manifest, "cache": "miss", "seconds": time.perf_counter() - t_start}


def _atomic_copy(src: Path, dst: Path, overwrite: bool) -> None:
    """Copy a directory tree so that ``dst`` appears complete or not at all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        _replace(tmp, dst, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _atomic_move_or_copy(src: Path, dst: Path, overwrite: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        tmp.rmdir()
        os.replace(src, tmp)  # same filesystem: a rename
    except OSError:
        _atomic_copy(src, dst, overwrite)
        return
    try:
        _replace(tmp, dst, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: Names of the directories :func:`optimize_pipeline` writes in a cache directory: finished entries (the
#: 32-hex-digit key) and the temporary ``.<key>.partial-*`` / ``.<key>.old-<pid>`` ones a killed run leaves.
_CACHE_ENTRY = re.compile(r"[0-9a-f]{32}")
_CACHE_LEFTOVER = re.compile(r"\.[0-9a-f]{32}\.(partial-.+|old-[0-9]+)")


def _is_cache_entry(d: Path) -> bool:
    """Whether ``d`` is a directory sdkern wrote into a cache: a finished entry whose manifest names it by its
    key, or a temporary directory of an interrupted run. Symlinks are never entries."""
    if d.is_symlink() or not d.is_dir():
        return False
    if _CACHE_LEFTOVER.fullmatch(d.name):
        return True
    if not _CACHE_ENTRY.fullmatch(d.name):
        return False
    try:
        manifest = json.loads((d / "sdkern_manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("key") == d.name and "format" in manifest


def clean_cache(cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete the cached ONNX pipelines in ``cache_dir``; returns how many entries were removed.

    Only directories sdkern wrote are deleted (see :func:`_is_cache_entry`); any other file or directory in
    ``cache_dir`` (a user's own data, a mistyped ``--cache-dir``) is left as it is.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not root.is_dir():
        return 0
    n = 0
    for d in sorted(root.iterdir()):
        if _is_cache_entry(d):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        else:
            logger.info("sdkern optimize: --clean-cache leaves %s (not a cache entry sdkern wrote)", d)
    return n


def _replace(tmp: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists")
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
