"""``sdkern optimize``: export, fuse, convert and cache a diffusers-style ONNX pipeline directory.

Stages per component (text_encoder, unet, vae_decoder, vae_encoder; SDXL adds text_encoder_2; a pipeline
with a ControlNet adds controlnet, ``safety_checker=True`` the safety checker; see :mod:`sdkern.apps.onnx.export`):

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdkern._version import __version__
from sdkern.apps.onnx.directory import write_pipeline_files
from sdkern.apps.onnx.export import components_of, export_component
from sdkern.apps.onnx.optimize import FUSED_OPS, optimize_component

logger = logging.getLogger("sdkern")


TARGETS = ("cpu", "cuda", "dml")


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


def _merge_lora(pipe: Any, lora: str | None, lora_scale: float) -> str | None:
    if lora is None:
        return None
    from sdkern import lora as lora_mod

    lora_mod.load(pipe, lora, adapter_name="optimize", scale=lora_scale, fuse=True)
    with open(lora, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
        Components to export; default every one of the pipeline (:func:`sdkern.apps.onnx.export.components_of`:
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
        write_pipeline_files(pipe, build)
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
