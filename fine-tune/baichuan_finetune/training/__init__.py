"""Building and running a training: LoRA, trainers, preference training, launch and preflight."""
