"""Config handling before any heavy work: the checks, the ``tune run`` launcher hook, the registry.

:mod:`~longlora_tune.config.validation` checks a recipe config and derives its settings (one line naming the
value and the fix per problem); :mod:`~longlora_tune.config.preflight` runs those checks once in the
``tune run`` launcher before torchrun starts the workers; :mod:`~longlora_tune.config.tune_registry` makes
the stock ``tune`` CLI know our recipes and configs by name (torch-free: the start-up hook imports it).
"""
