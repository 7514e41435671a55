"""Flash attention (forward and backward) as Pallas kernels for TPU and GPU, with a plain-jnp reference."""

from pallas_kernels.flash_attention.api import (
    BlockSizes,
    choose_impl,
    default_block_sizes,
    flash_attention,
)

__all__ = ["BlockSizes", "choose_impl", "default_block_sizes", "flash_attention"]
