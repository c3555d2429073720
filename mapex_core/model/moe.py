"""Mixture-of-modality-experts FFN layer.

Read top to bottom:

1. **Router.** ``logits = h @ W_r + B[modality]``: a linear router plus a learned
   ``(num_modalities, E)`` routing bias, initialised to favour each modality's own expert group.
   ``routing="standard"`` drops the bias (the ablation). Top-k experts per token; the gates are
   a softmax over the k selected logits.
2. **Balance loss.** Switch-style ``n * sum_e f_e * P_e``, computed for each modality on its own
   tokens over the experts that modality may use (its own group plus the shared experts; all
   experts when routing is ``"standard"``), renormalised within that set so the loss balances
   load *inside* a group without pulling tokens out of their modality's group, then averaged
   over the modalities present. It is 1.0 when balanced.
3. **Dispatch.** ``impl="sorted"`` (fast path): sort the ``N * k`` token-slots by expert, gather
   the tokens once in that order, run each expert on its contiguous slice, scale by the gates
   and scatter-add back into the token rows. The one host sync is the list of slice lengths. ``impl="loop"`` is the readable reference: for each
   expert, find its tokens and add its weighted output. Tests use the loop as the oracle.
   ``impl="dense"`` is for export only (ONNX, ``torch.export``): every expert runs on every token
   and a dense ``(N, E)`` gate matrix, zero for the experts a token did not choose, combines
   them. It has no data-dependent shapes, so exporters trace it; it costs ``E / k`` times the
   expert FLOPs, which is small for pruned models (few experts). Same result as the others.
4. **All experts.** A layer left with exactly ``top_k`` experts (pruned down to ``top_k``) has
   nothing to choose: every token goes to every expert. Its gates are the softmax over all its
   logits (what the top-k softmax is when ``k = E``); the experts run on all tokens as one batched
   matmul pair and their outputs are summed with the gates: no top-k selection, no sort, no
   gather or scatter, no host sync. ``impl="sorted"`` and ``"dense"`` take this path (it has no
   data-dependent shapes either, so it exports); ``impl="loop"`` keeps its top-k path, the oracle.
   ``all_experts_when_full = False`` turns it off (benchmarks compare both on the same weights).

Expert weights are stacked: ``w1 (E, D, H)``, ``b1 (E, H)``, ``w2 (E, H, D)``, ``b2 (E, D)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

IMPLS = ("sorted", "loop", "dense")


def _count(index: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """``bincount`` without its host sync on CUDA (it reads min/max back): an ``index_add``."""
    return torch.zeros(size, dtype=dtype, device=index.device).index_add_(
        0, index, torch.ones_like(index, dtype=dtype)
    )


def default_expert_groups(num_experts: int, num_modalities: int) -> list[int]:
    """Owner modality of each expert: equal groups in modality order, the rest shared (-1)."""
    per = num_experts // num_modalities if num_modalities else 0
    return [e // per if per and e < per * num_modalities else -1 for e in range(num_experts)]


class MoELayer(nn.Module):
    """Top-k mixture of GELU-MLP experts with a modality-conditioned router.

    Args:
        dim: token width D.
        hidden_dim: expert hidden width H.
        num_experts: number of experts E in this layer.
        top_k: experts per token.
        num_modalities: number of modalities M the routing bias has rows for.
        routing: ``"modality"`` or ``"standard"``.
        impl: ``"sorted"`` (fast), ``"loop"`` (reference) or ``"dense"`` (export); may be changed
            after construction.
        expert_groups: owner modality of each expert (``-1`` = shared); default equal groups.
        bias_init: initial routing bias of a modality towards its own group.

    Attributes:
        all_experts_when_full: when the layer has exactly ``top_k`` experts, send every token to
            every expert without top-k selection or dispatch (see the module docstring, 4.).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        num_modalities: int,
        routing: str = "modality",
        impl: str = "sorted",
        expert_groups: list[int] | None = None,
        bias_init: float = 1.0,
    ) -> None:
        super().__init__()
        if routing not in ("modality", "standard"):
            raise ValueError(f"routing must be 'modality' or 'standard', got {routing!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
        groups = expert_groups or default_expert_groups(num_experts, num_modalities)
        if len(groups) != num_experts:
            raise ValueError(f"expert_groups has {len(groups)} entries, expected {num_experts}")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_experts, self.top_k, self.num_modalities = num_experts, top_k, num_modalities
        self.routing = routing
        self.impl = impl
        self.all_experts_when_full = True

        self.router = nn.Parameter(torch.empty(dim, num_experts))  # W_r
        self.modality_bias = nn.Parameter(torch.empty(num_modalities, num_experts))  # B
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.register_buffer("expert_group", torch.tensor(groups, dtype=torch.long), persistent=False)
        self.original_experts = list(range(num_experts))  # pruning records the source indices
        self._routing_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()
        self.reset_parameters(bias_init)

    def reset_parameters(self, bias_init: float = 1.0) -> None:
        if self.router.is_meta:  # built to adopt loaded weights: initialising meta tensors only costs
            return  # memory (torch's meta path for normal_ imports torch._dynamo, ~75 MB)
        nn.init.normal_(self.router, std=0.02)
        for e in range(self.num_experts):  # same scale as an nn.Linear per expert
            nn.init.kaiming_uniform_(self.w1[e].T, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.w2[e].T, a=math.sqrt(5))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)
        with torch.no_grad():
            own = self.expert_group.unsqueeze(0) == torch.arange(self.num_modalities).unsqueeze(1)
            self.modality_bias.copy_(own.float() * bias_init)  # (M, E)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, routing={self.routing!r}, impl={self.impl!r}"
        )

    # ----- routing ------------------------------------------------------------------------
    def logits(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        """Router logits ``(N, E)`` (fp32) of tokens ``x (N, D)`` with modalities ``(N,)``."""
        logits = (x @ self.router.to(x.dtype)).float()  # (N, E)
        if self.routing == "modality":
            logits = logits + self.modality_bias.float()[modality_ids]  # (N, E)
        return logits

    def route(self, x: Tensor, modality_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities and the top-k choice.

        Args:
            x: tokens ``(N, D)``.
            modality_ids: modality index of each token ``(N,)``.

        Returns:
            ``probs (N, E)`` softmax over all experts (fp32, for the balance loss),
            ``top_idx (N, k)`` chosen experts, ``gates (N, k)`` softmax over the chosen logits.
        """
        logits = self.logits(x, modality_ids)  # (N, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)  # (N, k)
        return logits.softmax(dim=-1), top_idx, top_logits.softmax(dim=-1)

    def uses_all_experts(self) -> bool:
        """Whether ``forward`` sends every token to every expert (``E == top_k``; not the loop oracle)."""
        return self.all_experts_when_full and self.num_experts == self.top_k and self.impl in ("sorted", "dense")

    def balance_loss(self, probs: Tensor, top_idx: Tensor, modality_ids: Tensor) -> Tensor:
        """Per-modality load-balancing loss (1.0 when balanced), averaged over present modalities."""
        m, e = self.num_modalities, self.num_experts
        slot_key = (modality_ids.unsqueeze(1) * e + top_idx).reshape(-1)  # (N*k,)
        counts = _count(slot_key, m * e, probs.dtype).view(m, e)  # (M, E)
        prob_sum = probs.new_zeros(m, e).index_add_(0, modality_ids, probs)  # (M, E)
        if self.routing == "modality":
            group = self.expert_group.unsqueeze(0)  # (1, E)
            mods = torch.arange(m, device=probs.device).unsqueeze(1)  # (M, 1)
            allowed = ((group == mods) | (group < 0)).float()  # (M, E)
        else:
            allowed = probs.new_ones(m, e)
        f = counts * allowed
        f = f / f.sum(1, keepdim=True).clamp_min(1e-9)
        p = prob_sum * allowed
        p = p / p.sum(1, keepdim=True).clamp_min(1e-9)
        per_modality = allowed.sum(1) * (f * p).sum(1)  # (M,)
        present = (counts.sum(1) > 0).float()  # (M,) modalities with tokens
        return (per_modality * present).sum() / present.sum().clamp_min(1.0)

    def register_routing_hook(self, hook: Callable[[MoELayer, Tensor, Tensor, Tensor], None]) -> RemovableHandle:
        """Call ``hook(layer, top_idx, gates, modality_ids)`` after every routing decision.

        ``top_idx (N, k)`` and ``gates (N, k)`` are the chosen experts and their weights (detached),
        ``modality_ids (N,)`` the tokens' modalities. Routing statistics
        (:func:`mapex_core.model.routing.collect_routing_stats`) are collected this way.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    # ----- experts ------------------------------------------------------------------------
    def expert(self, e: int, x: Tensor) -> Tensor:
        """Apply expert ``e`` to tokens ``x (n, D)`` -> ``(n, D)``."""
        h = F.gelu(torch.addmm(self.b1[e], x, self.w1[e]))  # (n, H)
        return torch.addmm(self.b2[e], h, self.w2[e])  # (n, D)

    def _dispatch_loop(self, x: Tensor, top_idx: Tensor, gates: Tensor) -> Tensor:
        """Reference: for each expert, gather its tokens, run it, add the gated output."""
        y = None
        for e in range(self.num_experts):
            hit = top_idx == e  # (N, k): which slots chose expert e
            token_ids = hit.any(dim=-1).nonzero().squeeze(-1)  # (n_e,)
            if token_ids.numel() == 0:
                continue
            gate = (gates * hit).sum(dim=-1)[token_ids]  # (n_e,)
            out = gate.unsqueeze(-1).to(x.dtype) * self.expert(e, x[token_ids])  # (n_e, D)
            if y is None:
                y = out.new_zeros(x.shape[0], self.dim)
            y = y.index_add(0, token_ids, out)
        return y if y is not None else x.new_zeros(x.shape)

    def _dispatch_sorted(self, x: Tensor, top_idx: Tensor, gates: Tensor) -> Tensor:
        """Fast path: sort token-slots by expert, one contiguous matmul pair per expert."""
        k = self.top_k
        flat_expert = top_idx.reshape(-1)  # (N*k,) expert of each token-slot
        order = flat_expert.argsort(stable=True)  # (N*k,) slots grouped by expert
        token_of_slot = torch.div(order, k, rounding_mode="floor")  # (N*k,) source token
        gate_sorted = gates.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # (N*k, 1)
        counts = _count(flat_expert, self.num_experts, torch.long)  # (E,)
        x_sorted = x.index_select(0, token_of_slot)  # (N*k, D), contiguous per expert
        y = x.new_zeros(x.shape[0], self.dim)  # (N, D)
        start = 0
        for e, n in enumerate(counts.tolist()):  # the one host sync: slice lengths
            if n:
                sl = slice(start, start + n)
                out = self.expert(e, x_sorted[sl]) * gate_sorted[sl]  # (n, D)
                y.index_add_(0, token_of_slot[sl], out.to(y.dtype))  # scatter-add to tokens
                start += n
        return y

    def _dispatch_dense(self, x: Tensor, top_idx: Tensor, gates: Tensor) -> Tensor:
        """Export path: all experts on all tokens, mixed by a dense gate matrix (no data-dependent shapes)."""
        dense_gates = gates.new_zeros(x.shape[0], self.num_experts)  # (N, E)
        dense_gates = dense_gates.scatter(1, top_idx, gates)  # (N, E): gate of chosen experts, 0 elsewhere
        h = F.gelu(torch.matmul(x, self.w1) + self.b1.unsqueeze(1))  # (N, D) @ (E, D, H) -> (E, N, H)
        out = torch.matmul(h, self.w2) + self.b2.unsqueeze(1)  # (E, N, H) @ (E, H, D) -> (E, N, D)
        out = out * dense_gates.t().unsqueeze(-1).to(x.dtype)  # (E, N, D) * (E, N, 1)
        return out.sum(dim=0)  # (N, D)

    def _combine_all(self, x: Tensor, gates: Tensor) -> Tensor:
        """Every expert on every token (``E == top_k``), outputs summed with the gates ``(N, E)``."""
        xs = x.expand(self.num_experts, -1, -1)  # (E, N, D), a view: every expert sees every token
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), xs, self.w1))  # (E, N, D) @ (E, D, H) -> (E, N, H)
        out = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # (E, N, H) @ (E, H, D) -> (E, N, D)
        y = (out * gates.t().unsqueeze(-1).to(out.dtype)).sum(dim=0)  # (E, N, D) * (E, N, 1) -> (N, D)
        return y.to(x.dtype)  # like the other paths under autocast

    def forward(self, x: Tensor, modality_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Route and run the experts.

        Args:
            x: tokens ``(N, D)``.
            modality_ids: modality index of each token ``(N,)`` (long).

        Returns:
            ``y (N, D)`` and the scalar balance loss (0 when gradients are off: inference).
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MoELayer expects x of shape (N, {self.dim}), got {tuple(x.shape)}")
        if modality_ids.shape != x.shape[:1]:
            raise ValueError(
                f"modality_ids must have shape ({x.shape[0]},), got {tuple(modality_ids.shape)}"
            )
        modality_ids = modality_ids.long()
        if x.shape[0] == 0:
            return x.new_zeros(x.shape), x.new_zeros((), dtype=torch.float32)
        if self.uses_all_experts():  # nothing to choose: every token to every expert, gated
            probs = gates = self.logits(x, modality_ids).softmax(dim=-1)  # (N, E)
            top_idx = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)  # (N, E), a view
        else:
            probs, top_idx, gates = self.route(x, modality_ids)
        # the balance loss only matters for a backward pass: skipped under no_grad / inference_mode
        aux = (self.balance_loss(probs, top_idx, modality_ids) if torch.is_grad_enabled()
               else x.new_zeros((), dtype=torch.float32))
        for hook in self._routing_hooks.values():
            hook(self, top_idx.detach(), gates.detach(), modality_ids)
        if self.uses_all_experts():
            y = self._combine_all(x, gates)
        elif self.impl == "sorted":
            y = self._dispatch_sorted(x, top_idx, gates)
        elif self.impl == "loop":
            y = self._dispatch_loop(x, top_idx, gates)
        elif self.impl == "dense":
            y = self._dispatch_dense(x, top_idx, gates)
        else:
            raise ValueError(f"MoELayer.impl must be one of {IMPLS}, got {self.impl!r}")
        return y, aux


class FeedForward(nn.Module):
    """Dense GELU MLP (the FFN of non-MoE blocks, and the dense baseline in benchmarks)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
