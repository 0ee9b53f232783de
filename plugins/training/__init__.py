"""Pure pieces of the LoRA trainer (``plugins/lora_trainer.py``): tokenising and packing rows,
the training loop with checkpoints, the base model and the adapter store."""
