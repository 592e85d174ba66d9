"""DNA (blockwisely supervised neural architecture search with knowledge distillation) in JAX/Flax."""

from dna_jax import host_memory

# Before JAX or TensorFlow start their threads: each takes a malloc arena of its own (host_memory).
host_memory.set_wanted_mode()
