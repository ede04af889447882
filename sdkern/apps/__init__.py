"""The tools built on the sdkern library: nothing in ``sdkern`` outside this package imports from it.

- :mod:`~sdkern.apps.cli`: the ``sdkern`` command (info, bench, generate, roofline, optimize, serve);
- :mod:`~sdkern.apps.bench`: engines, measurement, reports and the roofline model behind ``sdkern bench``;
- :mod:`~sdkern.apps.generate`, :mod:`~sdkern.apps.video`, :mod:`~sdkern.apps.imageio`: ``sdkern generate``;
- :mod:`~sdkern.apps.models`: offline presets (real SD architectures, random weights);
- :mod:`~sdkern.apps.onnx`: ONNX export, optimisation (``sdkern optimize``) and the ONNX Runtime pipelines;
- :mod:`~sdkern.apps.serve`: ``sdkern serve`` (HTTP server, batching, Ray Serve) and ``deploy``.

Each is also importable as ``sdkern.<name>`` (:mod:`sdkern._aliases`), the paths README and docs show.
"""
