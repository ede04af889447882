"""Runtime: device backends (CUDA, CPU, DirectML, HPU, others), graph capture, CPU-drawn noise, CPU allocator tuning."""

from sdkern.runtime.allocator import AllocatorTuning, release_free_memory, tune_cpu_allocator
from sdkern.runtime.backends import Backend, available_backends, backend_for
from sdkern.runtime.graphs import CudaGraphBackend, GraphBackend, GraphRunner, disable, enable, runner_of
from sdkern.runtime.noise import pipeline_latents, randn

__all__ = [
    "AllocatorTuning",
    "Backend",
    "CudaGraphBackend",
    "GraphBackend",
    "GraphRunner",
    "available_backends",
    "backend_for",
    "disable",
    "enable",
    "pipeline_latents",
    "randn",
    "release_free_memory",
    "runner_of",
    "tune_cpu_allocator",
]
