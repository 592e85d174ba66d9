"""Test setup: 8 simulated CPU devices stand in for a TPU host; fast compiles."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax

jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_platforms', 'cpu')
