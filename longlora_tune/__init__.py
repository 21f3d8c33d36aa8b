"""longlora_tune: LongLoRA for torchtune.

Shifted sparse attention (S²-Attn) during training, LoRA on the attention projections with
trainable embeddings and norms (LoRA+), and linear position interpolation, packaged as
torchtune components, recipes and configs.
"""

__version__ = "0.1.0"
