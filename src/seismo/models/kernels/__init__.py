"""Fused Pallas kernels (jax.experimental.pallas). Import the kernel modules directly:

    from seismo.models.kernels.flash_sigmoid import flash_sigmoid_attention
"""
