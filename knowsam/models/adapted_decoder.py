"""KnowSAM's two-way transformer for SAM's mask decoder (official ``Model/common/two_way_transformer.py`` 7-200).

The official build (``Model/sam/build_sam.py`` 96-107) does not use SAM's transformer. Its
differences, all reproduced here:

* every two-way block has one attention adapter (with skip), applied to the output of the
  self-attention and of both cross-attentions before each residual sum, and one MLP adapter (no
  skip) in parallel with the MLP, scaled by 0.5;
* the self-attention adds its output to its input in the first block too (SAM replaces the
  queries there), and in the later blocks it attends with the position-embedded queries as
  queries, keys *and values*, and adds its output to them (SAM: values and residual without
  the positional embedding);
* the transformer's own attention adapter follows the final token-to-image attention and, a
  second time, the final LayerNorm.

The official transformer also builds an MLP adapter of its own that its forward never calls
(33,088 parameters at width 256, trainable, never updated); it is left out here.

The modules are SAM's own (``segment_anything``'s attention, MLP and LayerNorm), taken over under
their original names, so a SAM checkpoint's ``mask_decoder.transformer.*`` keys still match. The
official MLPs are renamed (``layers.0.0``/``fc`` instead of ``lin1``/``lin2``), so the official
runs never load the checkpoint's decoder MLPs; :class:`knowsam.models.sam_teacher.SamTeacher`
reproduces that by leaving them out of the load (``sam.load_decoder_mlp``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer

from knowsam.models.adapter import Adapter


class AdaptedTwoWayBlock(nn.Module):
    """SAM's ``TwoWayAttentionBlock`` with KnowSAM's adapters and self-attention (official lines 110-198)."""

    MLP_ADAPTER_SCALE = 0.5

    def __init__(self, block: TwoWayAttentionBlock):
        super().__init__()
        self.self_attn, self.norm1 = block.self_attn, block.norm1
        self.cross_attn_token_to_image, self.norm2 = block.cross_attn_token_to_image, block.norm2
        self.mlp, self.norm3 = block.mlp, block.norm3
        self.cross_attn_image_to_token, self.norm4 = block.cross_attn_image_to_token, block.norm4
        self.skip_first_layer_pe = block.skip_first_layer_pe
        dim = block.norm1.normalized_shape[0]
        self.attn_adapter = Adapter(dim, skip=True)  # one module, used after all three attentions
        self.mlp_adapter = Adapter(dim, skip=False)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.skip_first_layer_pe:
            queries = queries + query_pe  # official: values and residual carry the embedding as well
        queries = self.norm1(queries + self.attn_adapter(self.self_attn(q=queries, k=queries, v=queries)))

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.attn_adapter(self.cross_attn_token_to_image(q=q, k=k, v=keys)))

        queries = self.norm3(queries + self.mlp(queries) + self.MLP_ADAPTER_SCALE * self.mlp_adapter(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.attn_adapter(self.cross_attn_image_to_token(q=k, k=q, v=queries)))
        return queries, keys


class AdaptedTwoWayTransformer(nn.Module):
    """SAM's ``TwoWayTransformer`` with adapted blocks and a final attention adapter (official lines 60-106)."""

    def __init__(self, transformer: TwoWayTransformer):
        super().__init__()
        self.layers = nn.ModuleList(AdaptedTwoWayBlock(block) for block in transformer.layers)
        self.final_attn_token_to_image = transformer.final_attn_token_to_image
        self.norm_final_attn = transformer.norm_final_attn
        self.attn_adapter = Adapter(transformer.embedding_dim, skip=True)  # used twice, as officially

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same interface as SAM's: image (B, C, H, W), its positional encoding, tokens (B, N, C)."""
        keys = image_embedding.flatten(2).transpose(1, 2)  # (B, HW, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = queries + self.attn_adapter(self.final_attn_token_to_image(q=q, k=k, v=keys))
        return self.attn_adapter(self.norm_final_attn(queries)), keys
