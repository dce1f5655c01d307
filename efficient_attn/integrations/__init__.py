"""Bridges from other libraries to our attention variants, each imported only on use.

* :mod:`efficient_attn.integrations.hf`: Hugging Face transformers' ``AttentionInterface`` and
  ``AttentionMaskInterface`` (``attn_implementation="efficient_attn:<key>"``); needs the ``peers`` extra.
* :mod:`efficient_attn.integrations.hf_models`: small transformers models with random weights (no downloads) that the
  tests and benchmarks share.

Importing ``efficient_attn`` or this package imports no integration (and so never transformers).
"""
