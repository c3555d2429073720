"""The MAPEX model: a multi-modal ViT whose FFNs are modality experts, with an MAE decoder.

Data flow (B = batch, M' = modalities present, L = patches per modality, T = M' * L tokens):

    inputs {m: (B, C_m, H, W)}
      -> per-modality patch embedding + 2-D sin-cos position + modality embedding
      -> tokens (B, T, D), modality ids (T,)
      -> [pre-training] keep a random (1 - mask_ratio) share of tokens per sample -> (B, K, D)
      -> encoder blocks (attention + dense FFN, or MoE FFN every `moe_every` blocks)
      -> [pre-training] light dense decoder over visible + mask tokens -> pixels per modality
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mapex_core.model.config import MapexConfig
from mapex_core.model.moe import FeedForward, MoELayer


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``(h * w, dim)``: half for rows, half for columns."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    out_y = ys.reshape(-1, 1) * omega  # (h*w, dim/4)
    out_x = xs.reshape(-1, 1) * omega  # (h*w, dim/4)
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)  # (h*w, dim)


def patchify(x: Tensor, p: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)*(W/p), p*p*C)``, row-major patches."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)  # (B, L, p*p*C)


class Attention(nn.Module):
    """Multi-head self-attention (``scaled_dot_product_attention``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)  # (B, T, 3, h, d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, T, d/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, d/h)
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block whose FFN is dense or a :class:`MoELayer`."""

    def __init__(self, dim: int, heads: int, hidden_dim: int, moe: MoELayer | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn: nn.Module = moe if moe is not None else FeedForward(dim, hidden_dim)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: Tensor, modality_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x (B, T, D)``, ``modality_ids (B, T)`` -> ``(x, balance loss or None)``."""
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if isinstance(self.ffn, MoELayer):
            if modality_ids is None:
                raise ValueError("a MoE block needs modality_ids")
            b, t, d = h.shape
            y, aux = self.ffn(h.reshape(b * t, d), modality_ids.reshape(b * t))  # (B*T, D)
            return x + y.reshape(b, t, d).to(x.dtype), aux  # (B, T, D)
        return x + self.ffn(h), None


@dataclass
class EncoderOutput:
    """Encoder result.

    Attributes:
        tokens: ``(B, T, D)`` normalised encoder tokens, modalities in model order.
        modality_ids: ``(T,)`` modality index (into ``config.modalities``) of each token.
        grid: ``(h, w)`` patch grid of each modality.
        aux_loss: mean balance loss over MoE layers.
    """

    tokens: Tensor
    modality_ids: Tensor
    grid: tuple[int, int]
    aux_loss: Tensor


@dataclass
class MAEOutput:
    """Masked-autoencoder pre-training result.

    Attributes:
        loss: ``recon_loss + balance_loss_weight * aux_loss``.
        recon_loss: mean over present modalities of the masked-patch MSE.
        aux_loss: mean balance loss over MoE layers.
        per_modality: masked-patch MSE per present modality (detached scalar tensors: reading
            them is a host sync, so a training loop does it only when it logs).
        mask: ``(B, T)`` 1 where a token was hidden from the encoder.
    """

    loss: Tensor
    recon_loss: Tensor
    aux_loss: Tensor
    per_modality: dict[str, Tensor]
    mask: Tensor


class MapexModel(nn.Module):
    """MAPEX: mixture-of-modality-experts ViT with a multi-modal MAE decoder.

    ``forward(inputs)`` runs masked-autoencoder pre-training and returns an :class:`MAEOutput`;
    ``encode(inputs)`` returns the unmasked encoder tokens for downstream heads and pruning.
    ``inputs`` maps any subset of ``config.modalities`` to ``(B, C_m, H, W)`` tensors on one grid.
    """

    def __init__(self, config: MapexConfig, with_decoder: bool = True) -> None:
        super().__init__()
        self.config = c = config
        self.with_decoder = with_decoder
        d, p = c.dim, c.patch_size
        self.patch_embed = nn.ModuleDict(
            {m: nn.Conv2d(c.in_chans[m], d, kernel_size=p, stride=p) for m in c.modalities}
        )
        self.modality_embed = nn.Parameter(torch.zeros(c.num_modalities, d))
        groups = c.expert_groups()
        blocks = []
        for i in range(c.depth):
            moe = None
            if i in c.moe_layers:
                experts = c.layer_experts(c.moe_layers.index(i))
                moe = MoELayer(
                    d,
                    c.hidden_dim,
                    num_experts=len(experts),
                    top_k=c.top_k,
                    num_modalities=c.num_modalities,
                    routing=c.routing,
                    expert_groups=[groups[e] for e in experts],
                    bias_init=c.router_bias_init,
                )
                moe.original_experts = experts
            blocks.append(Block(d, c.heads, c.hidden_dim, moe))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)

        if with_decoder:  # the MAE decoder; task models (encoder + head) leave it out
            self._build_decoder()
        self._init_weights()

    def _build_decoder(self) -> None:
        c = self.config
        d, p, dd = c.dim, c.patch_size, c.decoder_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_embed = nn.Parameter(torch.zeros(c.num_modalities, dd))
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, c.decoder_heads, int(c.mlp_ratio * dd)) for _ in range(c.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.ModuleDict(
            {m: nn.Linear(dd, p * p * c.in_chans[m]) for m in c.modalities}
        )

    def _init_weights(self) -> None:
        if self.modality_embed.is_meta:  # built on the meta device to adopt loaded weights: nothing to draw
            return
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        for conv in self.patch_embed.values():
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.normal_(self.modality_embed, std=0.02)
        if self.with_decoder:
            nn.init.normal_(self.decoder_modality_embed, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (each MoE layer's expert owners) from the config.

        Needed after building on the ``meta`` device and loading weights with ``assign=True``.
        """
        groups = self.config.expert_groups()
        for blk in self.blocks:
            if isinstance(blk.ffn, MoELayer):
                owners = [groups[e] for e in blk.ffn.original_experts]
                blk.ffn.expert_group = torch.tensor(owners, dtype=torch.long, device=blk.ffn.w1.device)

    # ----- inputs -------------------------------------------------------------------------
    def validate_inputs(self, inputs: dict[str, Tensor]) -> tuple[int, int, int]:
        """Check modality names, band counts and shapes; return ``(B, H, W)``.

        Raises:
            ValueError: naming the modality, the expected and the actual shape.
        """
        c = self.config
        if not isinstance(inputs, dict) or not inputs:
            raise ValueError(f"inputs must be a non-empty dict modality -> tensor; this model takes {c.modalities}")
        ref_name, ref = None, None
        for m, x in inputs.items():
            if m not in c.in_chans:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"unknown modality {m!r} (input shape {shape}); this model takes "
                                 + ", ".join(f"{k} (B, {v}, H, W)" for k, v in c.in_chans.items()))
            expected = f"(B, {c.in_chans[m]}, H, W)"
            if not isinstance(x, Tensor) or x.dim() != 4:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"modality {m!r}: expected a tensor of shape {expected}, got {shape}")
            if x.shape[1] != c.in_chans[m]:
                raise ValueError(
                    f"modality {m!r}: expected {c.in_chans[m]} bands, shape {expected}, "
                    f"got {tuple(x.shape)}"
                )
            if ref is None:
                ref_name, ref = m, x
                h, w = x.shape[-2:]
                if h % c.patch_size or w % c.patch_size:
                    raise ValueError(
                        f"modality {m!r}: H and W must be multiples of patch_size "
                        f"{c.patch_size}, got shape {tuple(x.shape)}"
                    )
            elif x.shape[0] != ref.shape[0] or x.shape[-2:] != ref.shape[-2:]:
                raise ValueError(
                    f"modality {m!r}: expected shape ({ref.shape[0]}, {c.in_chans[m]}, "
                    f"{ref.shape[-2]}, {ref.shape[-1]}) to match {ref_name!r}, got {tuple(x.shape)}"
                )
        assert ref is not None
        return ref.shape[0], ref.shape[-2], ref.shape[-1]

    def present(self, inputs: dict[str, Tensor]) -> list[str]:
        """Modalities of ``inputs`` in model order."""
        return [m for m in self.config.modalities if m in inputs]

    def tokenize(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Patch-embed every present modality.

        Returns:
            tokens ``(B, T, D)``, modality ids ``(T,)``, patch grid ``(h, w)``.
        """
        _, hh, ww = self.validate_inputs(inputs)
        p = self.config.patch_size
        grid = (hh // p, ww // p)
        dev = next(iter(inputs.values())).device
        pos = sincos_2d(*grid, self.config.dim, dev)  # (L, D)
        tokens, ids = [], []
        for m in self.present(inputs):
            i = self.config.modalities.index(m)
            t = self.patch_embed[m](inputs[m])  # (B, D, h, w)
            t = t.flatten(2).transpose(1, 2)  # (B, L, D)
            tokens.append(t + pos + self.modality_embed[i])
            ids.append(torch.full((t.shape[1],), i, dtype=torch.long, device=dev))
        return torch.cat(tokens, 1), torch.cat(ids), grid  # (B, T, D), (T,)

    # ----- encoder ------------------------------------------------------------------------
    def run_encoder(self, x: Tensor, modality_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder blocks + final norm. ``x (B, T, D)``, ``modality_ids (B, T)``."""
        aux_losses = []
        for blk in self.blocks:
            x, aux = blk(x, modality_ids)
            if aux is not None:
                aux_losses.append(aux)
        aux = torch.stack(aux_losses).mean() if aux_losses else x.new_zeros((), dtype=torch.float32)
        return self.norm(x), aux

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        """Encode all tokens of the present modalities (no masking)."""
        tokens, ids, grid = self.tokenize(inputs)
        x, aux = self.run_encoder(tokens, ids.unsqueeze(0).expand(tokens.shape[0], -1))
        return EncoderOutput(tokens=x, modality_ids=ids, grid=grid, aux_loss=aux)

    # ----- masked-autoencoder pre-training ------------------------------------------------
    def forward(
        self,
        inputs: dict[str, Tensor],
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """Masked-autoencoder loss on ``inputs`` (normalised bands).

        Args:
            inputs: modality -> ``(B, C_m, H, W)``; any subset of the configured modalities.
            mask_ratio: share of tokens to hide; defaults to ``config.mask_ratio``.
            generator: RNG for the mask (reproducible runs and resumes).
        """
        c = self.config
        if not self.with_decoder:
            raise RuntimeError("this MapexModel was built without the MAE decoder; use encode()")
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        tokens, ids, grid = self.tokenize(inputs)
        b, t, d = tokens.shape
        keep = max(1, int(round(t * (1.0 - ratio))))
        noise = torch.rand(b, t, device=tokens.device, generator=generator)  # (B, T)
        ids_shuffle = noise.argsort(dim=1)  # (B, T)
        ids_restore = ids_shuffle.argsort(dim=1)  # (B, T)
        ids_keep = ids_shuffle[:, :keep]  # (B, K)
        visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, K, D)
        latent, aux = self.run_encoder(visible, ids[ids_keep])  # (B, K, D)

        mask = torch.ones(b, t, device=tokens.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore)  # (B, T), 1 = hidden

        z = self.decoder_embed(latent)  # (B, K, Dd)
        z = torch.cat([z, self.mask_token.to(z.dtype).expand(b, t - keep, -1)], dim=1)  # (B, T, Dd)
        z = z.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # unshuffle
        pos = sincos_2d(*grid, c.decoder_dim, tokens.device)  # (L, Dd)
        n_present = t // pos.shape[0]
        z = z + pos.repeat(n_present, 1) + self.decoder_modality_embed[ids]  # (B, T, Dd)
        for blk in self.decoder_blocks:
            z, _ = blk(z)
        z = self.decoder_norm(z)

        losses, per_modality = [], {}
        n_patch = pos.shape[0]
        for j, m in enumerate(self.present(inputs)):
            sl = slice(j * n_patch, (j + 1) * n_patch)
            pred = self.decoder_pred[m](z[:, sl]).float()  # (B, L, p*p*C)
            target = patchify(inputs[m].float(), c.patch_size)  # (B, L, p*p*C)
            err = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
            loss_m = (err * mask[:, sl]).sum() / mask[:, sl].sum().clamp_min(1.0)
            losses.append(loss_m)
            per_modality[m] = loss_m.detach()
        recon = torch.stack(losses).mean()
        return MAEOutput(
            loss=recon + c.balance_loss_weight * aux,
            recon_loss=recon,
            aux_loss=aux,
            per_modality=per_modality,
            mask=mask,
        )

    # ----- bookkeeping --------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per component: patch embeddings, experts, routers, dense encoder, decoder."""
        out = {"patch_embed": 0, "experts": 0, "routers": 0, "encoder_dense": 0, "decoder": 0}
        for name, p in self.named_parameters():
            n = p.numel()
            if name.startswith(("patch_embed", "modality_embed")):
                out["patch_embed"] += n
            elif name.startswith(("decoder", "mask_token")):
                out["decoder"] += n
            elif ".ffn." in name and name.rsplit(".", 1)[-1] in ("w1", "b1", "w2", "b2"):
                out["experts"] += n
            elif name.endswith((".router", ".modality_bias")):
                out["routers"] += n
            else:
                out["encoder_dense"] += n
        return out
