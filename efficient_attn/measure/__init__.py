"""Measuring tools, one small module each, with CPU and CUDA paths: ``timing`` (median and IQR of a call),
``memory`` (peak of one call, peak RSS), ``storage`` (the live-storage tracker both memory and the harness's
prediction count with), ``flops`` (FLOP counting, useful FLOPs per mode), ``bandwidth`` (streaming copy bandwidth, what decode is bound by).

They take a callable and a device, nothing more: they know nothing of cells, suites or run folders, and import
nothing from :mod:`efficient_attn.harness` (which uses them).
"""
