"""Training infrastructure the recipe composes: checkpoints, resume policy, distribution, memory levers.

Each module has one job: ``checkpointing`` (step folders: format, manifest, lineage, pruning, the
output-folder lock), ``resume`` (what a resume may change), ``weights`` (the state a run starts from),
``distributed`` (device, dtype, process groups, FSDP2, seeded LoRA init), ``activation_checkpointing``,
``sequence_tiling``, ``compile``, ``qlora``, ``schedulers`` and ``metric_logging``.
"""
