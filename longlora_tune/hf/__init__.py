"""Hugging Face interoperability: a base folder read once, and the exports that load in transformers and PEFT.

:mod:`~longlora_tune.hf.base` (:class:`~longlora_tune.hf.base.HFBaseModel`: ``config.json``, family, builder
arguments, RoPE, tokenizer, weights in torchtune names), :mod:`~longlora_tune.hf.export` (merged ``hf/``,
``peft/`` and ``adapter/`` folders, each written all-or-nothing) and :mod:`~longlora_tune.hf.peft` (the PEFT
adapter with the trained embedding and norms as ``modules_to_save``).
"""
