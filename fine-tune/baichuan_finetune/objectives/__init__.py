"""What the model computes beyond itself: head losses, attention kernels, quantization."""
