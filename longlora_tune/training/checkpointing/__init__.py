"""Our checkpoint folders, in four modules:

* :mod:`~longlora_tune.training.checkpointing.format`: the files of a step folder, its manifest, writing
  and verifying them, reading them back;
* :mod:`~longlora_tune.training.checkpointing.lineage`: which run wrote which checkpoint, the atomic save
  of a step folder, and which checkpoint ``resume_from_checkpoint=true`` picks;
* :mod:`~longlora_tune.training.checkpointing.housekeeping`: pruning, leftovers of interrupted saves and
  the ``output_dir`` lock;
* :mod:`~longlora_tune.training.checkpointing.rng`: the random number generators saved per rank.

Base weights are read from Hugging Face folders by :mod:`longlora_tune.hf.base`; what a run saves and
restores is :class:`longlora_tune.training.checkpoint_manager.CheckpointManager`.
"""
