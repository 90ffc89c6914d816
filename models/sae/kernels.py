"""Fast paths of the training step: autograd functions whose backward passes skip work autograd
would do by default.

- `encoder_pre_acts`: the dense encoder. Autograd would compute the gradient of (x - b_dec), a
  [B, d_sae] x [d_sae, d_in] product, only to sum it into b_dec's gradient; here b_dec's gradient is
  -W_enc @ (column sums of the upstream gradient), a matrix-vector product.
- `batch_top_k`: BatchTopK's selection of the k largest entries of a whole batch, on the CPU by
  numpy's introselect, several times faster than torch.topk's heap over one long dimension.
- `SparseActs` + `selected_pre_acts` + `sparse_decode`: the TopK family's training step when
  k << d_sae. Only the selected pre-activations carry gradients, so the decoder is an
  `embedding_bag` over the selected latents (per-sample weights = their activations) and the
  encoder's backward scatters into the selected columns only: both cost B*k*d_in instead of
  B*d_sae*d_in. The dense forward product x @ W_enc stays (every latent is a candidate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class _EncoderPreActs(torch.autograd.Function):
    """(x - b_dec) @ W_enc + b_enc, computed exactly as the expression reads (same values as the
    plain expression), with b_dec's gradient as a matrix-vector product."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec)
        return (x - b_dec) @ W_enc + b_enc

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, b_dec = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        col_sums = grad.sum(0)
        grad_x = (grad @ W_enc.T).reshape(x.shape) if ctx.needs_input_grad[0] else None
        grad_W_enc = (x - b_dec).reshape(-1, x.shape[-1]).T @ grad
        return grad_x, grad_W_enc, col_sums, -(W_enc @ col_sums)


def encoder_pre_acts(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    return _EncoderPreActs.apply(x, W_enc, b_enc, b_dec)


def firing_counts(f: Tensor) -> Tensor:
    """How many rows each latent fired on, for activations f >= 0 [..., d_sae], as int64 [d_sae].

    sign(f) is 1 where f fired and 0 elsewhere; summing it with a matrix-vector product is exact
    (integers below 2**24) and several times faster on CPU than a boolean count."""
    f = f.detach().reshape(-1, f.shape[-1])
    if f.shape[0] >= 2**24:
        return torch.count_nonzero(f, dim=0)
    return (f.new_ones(f.shape[0]) @ torch.sign(f)).long()


def batch_top_k(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of a 1-D tensor and their indices, in no particular order (what
    values.topk(k, sorted=False) gives, ties at the k-th value aside, NaN counting as largest).

    torch.topk runs one thread's heap over a dimension this long; numpy's argpartition is a linear
    introselect that releases the GIL: 6.8 -> 0.9 ms for BatchTopK's 16,384 of 524,288 (--quick's
    batch), 399 -> 101 ms at batch 4096, d_sae 6144 (2 cores). Every caller puts the selection
    into index order or scatters it, so the order it comes in never reaches a result."""
    if values.device.type != "cpu" or values.dtype not in (torch.float32, torch.float64) or not 0 < k < values.numel():
        return values.topk(k, sorted=False)
    flat = values.detach().contiguous().numpy()
    indices = torch.from_numpy(np.argpartition(flat, flat.size - k)[flat.size - k:])
    return values[indices], indices


def bag_offsets(sorted_bags: Tensor, n_bags: int) -> Tensor:
    """Where each bag starts in a sorted list of bag ids (embedding_bag's offsets): the exclusive
    cumulative count, found by search so that no size is read on the host (bincount reads the
    largest id, which on a GPU waits for the step)."""
    return torch.searchsorted(sorted_bags, torch.arange(n_bags, device=sorted_bags.device))


@dataclass
class SparseActs:
    """Active latents of a batch in embedding_bag layout: row r's latents are
    cols[offsets[r]:offsets[r + 1]] (the last row runs to the end)."""

    cols: Tensor  # [nnz] long
    offsets: Tensor  # [B] long
    rows: Tensor  # [nnz] long: the row of each entry

    @classmethod
    def from_topk(cls, idx: Tensor) -> SparseActs:
        """Per-row selections idx [B, k]."""
        B, k = idx.shape
        rows = torch.arange(B, device=idx.device)
        return cls(idx.reshape(-1), rows * k, rows.repeat_interleave(k))

    @classmethod
    def from_flat(cls, flat_idx: Tensor, n_rows: int, width: int) -> SparseActs:
        """Selections anywhere in a [n_rows, width] matrix, given as flat (row-major) indices."""
        flat_idx = flat_idx.sort().values  # row-major order groups each row's entries together
        rows = flat_idx // width
        return cls(flat_idx % width, bag_offsets(rows, n_rows), rows)

    def gather(self, pre: Tensor) -> Tensor:
        return pre[self.rows, self.cols]

    def firing_counts(self, values: Tensor, d_sae: int) -> Tensor:
        """How many rows each latent fired on (value > 0), as int64 [d_sae]."""
        # Not bincount over the firing entries: selecting them and bincount's output size are read
        # on the host, which on a GPU waits for the step.
        return torch.zeros(d_sae, dtype=torch.int64, device=values.device).index_add_(0, self.cols, (values > 0).long())


def _scatter_rows(acts: SparseActs, weights: Tensor, rows_in: Tensor, n_latents: int) -> Tensor:
    """[n_latents, d]: row i = sum over entries e with cols[e] == i of weights[e] * rows_in[row of e].

    This is the weight gradient of embedding_bag, whose kernel does exactly this accumulation."""
    table = torch.zeros(n_latents, rows_in.shape[-1], dtype=rows_in.dtype, device=rows_in.device, requires_grad=True)
    with torch.enable_grad():
        out = F.embedding_bag(acts.cols, table, acts.offsets, mode="sum", per_sample_weights=weights)
        (grad,) = torch.autograd.grad(out, table, rows_in)
    return grad


class _SelectedPreActs(torch.autograd.Function):
    """Pre-activations at the selected entries (values already computed in the forward), with
    gradients to W_enc, b_enc and b_dec that touch the selected latents only."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                acts: SparseActs) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec)
        ctx.acts = acts
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, b_dec = ctx.saved_tensors
        acts: SparseActs = ctx.acts
        d_sae = W_enc.shape[1]
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, acts.cols, grad)
        grad_W_enc = _scatter_rows(acts, grad, x - b_dec, d_sae).T
        return None, None, grad_W_enc, grad_b_enc, -(W_enc @ grad_b_enc), None


def selected_pre_acts(pre: Tensor, acts: SparseActs, x: Tensor, W_enc: Tensor, b_enc: Tensor,
                      b_dec: Tensor) -> Tensor:
    """The entries of pre = encoder_pre_acts(x, ...) at `acts`, as a [nnz] tensor that carries
    gradients to the encoder. `pre` itself is computed without gradients."""
    return _SelectedPreActs.apply(acts.gather(pre), x, W_enc, b_enc, b_dec, acts)


def sparse_decode(acts: SparseActs, values: Tensor, W_dec: Tensor) -> Tensor:
    """sum over each row's active latents of value * decoder row: [B, d_in], without b_dec."""
    return F.embedding_bag(acts.cols, W_dec, acts.offsets, mode="sum", per_sample_weights=values)
