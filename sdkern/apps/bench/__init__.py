"""Benchmarking for ``sdkern bench``: engines, measurement, reports and the U-Net roofline.

Modules
-------
engines
    How each engine (eager, sdkern, sdkern-graphs, compile, ort) prepares and restores a pipeline.
measure
    End-to-end timing, per-step timestamps, peak memory (CUDA allocator, NVML, process RSS).
runner
    :func:`run_bench`: every engine on the same pipeline, prompts and CPU-drawn latents.
report
    Table (ONNX Runtime benchmark.py columns first), JSON, CSV and a latency plot.
roofline
    FLOPs and minimum bytes per U-Net step by op class, and floor times on A100/H100 or any device.
"""
