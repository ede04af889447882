"""The worker side of benchmarks/cpu_peers.py: builds one contender in its own process and runs its steps.

The parent (cpu_peers.py) starts :func:`_worker` per contender and sends it "step" commands; everything here
runs in the worker process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_BUILD_S = [0.0]  # seconds spent constructing the random-weight model (not part of any engine's setup)


def _model(config: str, dtype: Any, device: str = "cpu") -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    from sdkern.models.configs import SD15

    cfg = dict(SD15.unet)
    if config == "small":  # a quick smoke configuration of the same architecture
        cfg.update(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, attention_head_dim=2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = UNet2DConditionModel(**cfg).eval().to(dtype)
    _BUILD_S[0] += time.perf_counter() - t0
    return model


def _inputs(config: str, size: int, dtype: Any) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    ctx_dim = 64 if config == "small" else 768
    x = torch.randn(2, 4, size, size, generator=g).to(dtype)
    ctx = torch.randn(2, 77, ctx_dim, generator=g).to(dtype)
    return x, torch.tensor(500.0), ctx


def _setup_pipeline(name: str, config: str, size: int, dname: str, steps: int) -> Any:
    """The whole txt2img pipeline (text encoder, ``steps`` U-Net steps with guidance, VAE decode) of the preset
    (``sd15``; ``tiny`` for ``config="small"``) at ``8 * size`` pixels, prepared by ``sdkern bench``'s engine
    ``name`` (eager, sdkern, openvino, ...); returns a callable running one call and returning the images
    (1, 3, 8*size, 8*size) as float32."""
    import torch

    from sdkern.apps.bench.engines import all_engines
    from sdkern.apps.bench.runner import PROMPT, BenchSettings, draw_latents, load_pipeline

    px = 8 * size
    s = BenchSettings(
        preset="tiny" if config == "small" else "sd15", height=px, width=px, steps=steps,
        dtype={"fp32": "float32", "bf16": "bfloat16"}[dname], engines=[name],
    )  # fmt: skip
    t0 = time.perf_counter()
    pipe = load_pipeline(s)
    pipe.set_progress_bar_config(disable=True)
    _BUILD_S[0] += time.perf_counter() - t0
    engine = all_engines().get(name)
    if engine is None:
        raise ValueError(f"no sdkern bench engine named {name!r}")
    why = engine.available(pipe, torch.device("cpu"))
    if why is not None:
        raise RuntimeError(why)
    engine.setup(pipe)
    latents = draw_latents(pipe, s)

    def call(p: Any) -> Any:
        return p(PROMPT, height=px, width=px, num_inference_steps=steps, latents=latents.clone(), output_type="pt")

    def run() -> Any:
        with torch.inference_mode():
            return engine.run(pipe, call).images.float()

    return run


def _setup(name: str, config: str, size: int, dname: str, threads: int, workdir: str, steps: int = 0) -> Any:
    """Build the contender; returns a callable running one step (``steps`` > 0: one whole pipeline call, see
    :func:`_setup_pipeline`) and returning the output (float32)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[dname]
    torch.set_num_threads(threads)
    if name.endswith("-malloc"):  # glibc malloc tuned as `sdkern bench/generate/serve` do (process-wide)
        from sdkern.runtime import tune_cpu_allocator

        if not tune_cpu_allocator().applied:
            raise RuntimeError("glibc malloc tuning is not available here")
        name = name.removesuffix("-malloc")
    if steps > 0:
        return _setup_pipeline(name, config, size, dname, steps)
    x, t, ctx = _inputs(config, size, dtype)
    if name == "sdkern-direct":  # every convolution on oneDNN's direct primitive (no im2col GEMM for small ones)
        from sdkern.patch import cpu_engine_modules

        cpu_engine_modules.IM2COL_MAX_PIXELS = 0
    if name in ("eager", "sdkern", "sdkern-direct", "sdkern-wino", "sdkern-wino-torch", "compile", "ref64"):
        model = _model(config, dtype)
        if name.startswith("sdkern"):
            import sdkern

            if name.startswith("sdkern-wino"):  # "fused": fail (the contender is skipped) rather than fall back
                from sdkern.patch import winograd

                winograd.TRANSFORMS = "torch" if name == "sdkern-wino-torch" else "fused"
            sdkern.patch(model, winograd=name.startswith("sdkern-wino"))
        if name == "compile":
            import torch._inductor.config as ic

            ic.freezing = True
            model = torch.compile(model)

        def step() -> Any:
            with torch.inference_mode():
                return model(x, t, encoder_hidden_states=ctx).sample.float()

        return step
    if name == "openvino":
        import openvino as ov

        model = _model(config, torch.float32)

        class Wrap(torch.nn.Module):
            def __init__(self, u: Any) -> None:
                super().__init__()
                self.u = u

            def forward(self, a: Any, b: Any, c: Any) -> Any:
                return self.u(a, b, encoder_hidden_states=c).sample

        xf, cf = x.float(), ctx.float()
        with torch.no_grad():
            om = ov.convert_model(Wrap(model), example_input=(xf, t, cf), input=[xf.shape, t.shape, cf.shape])
        del model
        hint = "bf16" if dname == "bf16" else "f32"
        cm = ov.Core().compile_model(
            om,
            "CPU",
            {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
        )
        req = cm.create_infer_request()
        feeds = [xf.numpy(), t.numpy(), cf.numpy()]

        def step() -> Any:
            req.infer(feeds)
            return torch.from_numpy(req.get_output_tensor(0).data.copy())

        return step
    if name in ("ort", "ort-sdkern", "ort-sdkern-omp"):
        import onnxruntime as ort

        from sdkern.onnx.build import optimize_component

        model = _model(config, torch.float32)

        class WrapO(torch.nn.Module):
            def __init__(self, u: Any) -> None:
                super().__init__()
                self.u = u

            def forward(self, a: Any, b: Any, c: Any) -> Any:
                return self.u(a, b, encoder_hidden_states=c, return_dict=False)[0]

        from diffusers.models.attention_processor import AttnProcessor

        model.set_attn_processor(AttnProcessor())  # the pattern ORT's optimiser fuses into MultiHeadAttention
        raw = Path(workdir) / f"{name}-raw" / "unet.onnx"
        raw.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            torch.onnx.export(
                WrapO(model), (x.float(), t, ctx.float()), str(raw), input_names=["sample", "timestep", "ctx"],
                output_names=["out"], dynamo=False, opset_version=17,
            )  # fmt: skip
        del model
        opt = Path(workdir) / f"{name}-opt" / "unet.onnx"
        optimize_component(raw, opt, "unet", "cpu", fp16=False, sdkern_ops=name != "ort")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        if name != "ort":
            import sdkern.ort

            if name == "ort-sdkern-omp":  # sdkern's kernels on their own OpenMP team (before session 12)
                os.environ["SDKERN_ORT_THREADS"] = "openmp"

            so.register_custom_ops_library(str(sdkern.ort.library_path()))
        sess = ort.InferenceSession(str(opt), so, providers=["CPUExecutionProvider"])
        feeds = {"sample": x.float().numpy(), "timestep": t.numpy(), "ctx": ctx.float().numpy()}
        if "timestep" not in {i.name for i in sess.get_inputs()}:
            feeds.pop("timestep")

        def step() -> Any:
            return torch.from_numpy(sess.run(None, feeds)[0])

        return step
    raise ValueError(f"unknown contender {name!r}")


def _worker(
    conn: Any, name: str, config: str, size: int, dname: str, threads: int, workdir: str, steps: int = 0
) -> None:
    import resource

    try:
        # imports are not setup: a fresh worker spends ~5 s importing torch and diffusers, which session 11 found
        # counted in every contender's setup (eager's 5.6-6.0 s)
        import diffusers  # noqa: F401
        import torch

        t0 = time.perf_counter()
        step = _setup(name, config, size, dname, threads, workdir, steps)
        out = step()
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = step()
        steady = time.perf_counter() - t1
        path = Path(workdir) / f"{name}-{dname}-{size}.pt"

        torch.save(out, path)
        setup = max(first - steady - _BUILD_S[0], 0.0)  # engine preparation + first-call excess, not model building
        conn.send({"ok": True, "setup_s": setup, "out": str(path)})
        while True:
            cmd = conn.recv()
            if cmd == "step":
                t1 = time.perf_counter()
                step()
                conn.send(time.perf_counter() - t1)
            else:
                conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                return
    except Exception as e:  # noqa: BLE001  (reported to the parent, which skips the contender)
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
