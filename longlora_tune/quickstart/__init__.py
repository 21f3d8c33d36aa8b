"""The CPU quick start: ``python -m longlora_tune.quickstart.demo`` and the tiny assets it trains on.

:mod:`~longlora_tune.quickstart.tiny` writes tiny random Hugging Face checkpoints, tokenizers and corpora of
every family (also used by the tests); :mod:`~longlora_tune.quickstart.demo` trains one end to end.
"""
