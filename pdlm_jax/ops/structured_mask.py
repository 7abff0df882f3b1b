"""The structured attention mask of SPEC §8, built on device from per-token segment arrays.

A caption-block row sees: its own block, the "fix prompt" (system/user header, image, question, assistant
header) and its own region's RoI span. Every other row sees every valid key. Padding keys are never seen.
"""

from __future__ import annotations

import jax.numpy as jnp


def allowed_mask(block_id: jnp.ndarray, roi_owner: jnp.ndarray, prefix_visible: jnp.ndarray,
                 valid: jnp.ndarray) -> jnp.ndarray:
    """(L,) segment arrays (see `PromptLayout`) -> (L, L) bool, True = query row may attend to key column.

    Works under `jax.vmap` for a batch of layouts.
    """
    q_block = block_id[:, None]
    in_block = q_block >= 0
    sees = (block_id[None, :] == q_block) | (roi_owner[None, :] == q_block) | prefix_visible[None, :]
    return valid[None, :] & (~in_block | sees)
