"""Fused LM head + cross-entropy for the embedded engine (engine option ``embedded: {fused_ce: ...}``).

The unfused path (transformers' ``ForCausalLMLoss``) materialises the logits of every token, [tokens x
vocabulary] in the model's dtype and again in fp32: for LLaMA 3.1 8B at seq 4096 that is ~2 GB per
sequence, and several memory-bound passes over it. Here the model's ``lm_head`` returns its input (the
final hidden states) and the loss is computed from them and the head's weight:

- ``chunked`` (``ChunkedLinearCrossEntropy``, pure PyTorch, CPU and GPU): chunk by chunk over tokens,
  logits -> log-sum-exp -> loss, and in the same pass the gradient of the hidden states (and of the
  head's weight when it requires grad; with LoRA it is frozen). Only one chunk's logits exist at a time.
- ``liger``: liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (Triton, CUDA only), the same idea.

Both keep the engine's loss: labels = the input ids shifted left by one, the last position ignored
(``IGNORE_INDEX``), mean over the tokens not ignored, logits upcast to at least fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
#: Logits entries per chunk (2**26 fp32 = 256 MiB): 512 tokens of a 128k vocabulary, 65,536 of 1,024.
CHUNK_ELEMENTS = 2**26


def chunk_tokens(vocab: int, elements: int | None = None) -> int:
    """Tokens per chunk: the largest power of two whose logits fit in ``elements`` (``CHUNK_ELEMENTS``)."""
    n = max(1, (elements or CHUNK_ELEMENTS) // vocab)
    return 1 << (n.bit_length() - 1)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over non-ignored tokens of cross_entropy(hidden @ weight.T, labels), without the full logits.

    hidden [N, H], weight [V, H], labels [N]. Gradients are computed in forward, chunk by chunk, and
    scaled by the incoming gradient in backward. With no token left (all ignored) the loss is NaN, as
    ``F.cross_entropy(..., reduction="mean")`` gives, and the gradients are zero.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                ignore_index: int = IGNORE_INDEX, chunk: int = 0, compiled: bool = False) -> torch.Tensor:
        chunk = chunk or chunk_tokens(weight.shape[0])
        fused = compiled_softmax_grad() if compiled and any(ctx.needs_input_grad[:2]) else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, as ForCausalLMLoss's .float()
        valid = labels != ignore_index
        count = valid.sum()
        scale = 1.0 / count.clamp(min=1).to(acc)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            ok = valid[start:start + chunk]
            target = torch.where(ok, labels[start:start + chunk], 0)
            if fused is not None:  # one compiled pass over the chunk's logits (embedded.compile)
                loss, grad = fused(h @ weight.t(), target, ok, scale)
                total += loss
                if want_h:
                    torch.matmul(grad, weight, out=grad_hidden[start:start + chunk])
                if want_w:
                    grad_weight += (grad.t() @ h).to(acc)
                continue
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(ok, lse - picked, 0).sum()
            if want_h or want_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(target), device=grad.device), target] -= 1
                grad *= (ok.to(acc) * scale)[:, None]
                grad = grad.to(hidden.dtype)
                if want_h:
                    torch.matmul(grad, weight, out=grad_hidden[start:start + chunk])
                if want_w:
                    grad_weight += (grad.t() @ h).to(acc)
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.want = (want_h, want_w)
        ctx.weight_dtype = weight.dtype
        return total / count.to(acc)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        want_h, want_w = ctx.want
        grad_h = grad_w = None
        if want_h:
            grad_h = saved.pop(0)
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if want_w:
            grad_w = (saved.pop(0) * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def softmax_grad(logits: torch.Tensor, target: torch.Tensor, ok: torch.Tensor,
                 scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and the gradient of its logits (in the logits' dtype), the eager path's math in
    functional form (no in-place updates, the target's -1 as a comparison with the vocabulary index), so
    that inductor makes it one pass over the logits: ``compiled_softmax_grad``."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    wide = logits.to(acc)
    lse = torch.logsumexp(wide, dim=-1)
    picked = wide.gather(1, target[:, None]).squeeze(1)
    loss = torch.where(ok, lse - picked, 0).sum()
    hit = torch.arange(wide.shape[1], device=wide.device)[None, :] == target[:, None]
    grad = ((wide - lse[:, None]).exp() - hit.to(acc)) * (ok.to(acc) * scale)[:, None]
    return loss, grad.to(logits.dtype)


@functools.cache
def compiled_softmax_grad():
    """``softmax_grad`` under torch.compile (built once per process, on first use)."""
    return torch.compile(softmax_grad, dynamic=False)


def shifted_labels(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The engine's labels as ``ForCausalLMLoss`` builds them: next token, the last position ignored."""
    return F.pad(input_ids, (0, 1), value=ignore_index)[..., 1:]


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int = IGNORE_INDEX, chunk: int = 0) -> torch.Tensor:
    return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                           ignore_index, chunk)


class HiddenStates(torch.nn.Module):
    """Stands in for a model's ``lm_head``: returns the final hidden states, keeps the head (its weight
    stays a parameter of the model, counted and trained as before)."""

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        if getattr(head, "bias", None) is not None:
            raise ValueError("fused_ce: the LM head has a bias; only bias-free heads (LLaMA, Mixtral) are supported")
        self.head = head

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class FusedHead:
    """The loss of a model whose ``lm_head`` was replaced by ``HiddenStates`` (``install``)."""

    def __init__(self, stand_in: HiddenStates, kind: str, compiled: bool = False) -> None:
        self.stand_in, self.kind, self.compiled = stand_in, kind, compiled
        if kind == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self._liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
        elif kind != "chunked":
            raise ValueError(f"fused_ce = {kind!r}: must be 'chunked' or 'liger'")

    def loss(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        labels = shifted_labels(input_ids).reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.kind == "liger":
            return self._liger(self.stand_in.weight, hidden, labels)
        return ChunkedLinearCrossEntropy.apply(hidden, self.stand_in.weight, labels, IGNORE_INDEX, 0, self.compiled)


def install(model: torch.nn.Module, kind: str, compiled: bool = False) -> FusedHead:
    """Replace ``model``'s output embeddings (a transformers model, or a peft model around one) by
    ``HiddenStates``, so that a forward without labels returns hidden states as its ``logits``. ``compiled``
    (embedded.compile): the chunked loss's per-chunk softmax and gradient run compiled."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fused_ce: the model's output embeddings are a {type(head).__name__}, not a Linear "
                         "(sharded by tensor parallelism?): fused_ce works on the data_parallel track")
    stand_in = HiddenStates(head)
    model.set_output_embeddings(stand_in)
    return FusedHead(stand_in, kind, compiled)
