"""A GPT/LlamaGen-style autoregressive model over token ids: the probe of `vistok probe`.

AR probing (GigaTok) trains the same small decoder-only transformer on each tokenizer's token
sequences and compares its validation loss: tokens that a generator finds easy to model score low.
This module is the model part only (pure torch: no Lightning, Hydra or files).

- Input at position t: the embedding of token t-1 (position 0: a class embedding, or a learned
  start embedding when unconditional) plus a learned position embedding; pre-norm blocks with
  causal ``F.scaled_dot_product_attention``; the output at position t predicts token t.
- Large codebooks are predicted **factorised**: an id is split into mixed-radix sub-codes of at
  most ``max_subcode`` values each (2^18 LFQ codes -> two 512-way digits, as Open-MAGVIT2 does),
  predicted one after another; digit j's head also sees the embeddings of digits < j, so the
  product of the heads is an exact chain-rule factorisation of p(token | context). The input
  embedding is likewise the sum of one table per digit, so no table or softmax has C rows.
- NLL in nats per token is the sum of the digits' cross-entropies; bits = nats / ln 2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from vistok.tokenizers.errors import VistokError


def subcode_sizes(codebook_size: int, max_subcode: int) -> list[int]:
    """Radices of the digits an id in [0, codebook_size) is split into, most significant first.

    One digit when ``codebook_size <= max_subcode``; otherwise m = ceil(log C / log max_subcode)
    digits of radix r (the smallest with r^m >= C; the leading digit only as large as needed):
    2^18 with max 4096 -> [512, 512]; 64000 -> [253, 253] (the 9 ids >= 64000 are never targets).
    """
    if codebook_size < 1 or max_subcode < 2:
        raise ValueError(f"codebook_size must be >= 1 and max_subcode >= 2, got {codebook_size} and {max_subcode}")
    if codebook_size <= max_subcode:
        return [codebook_size]
    m = math.ceil(math.log(codebook_size) / math.log(max_subcode) - 1e-12)
    r = max(2, round(codebook_size ** (1 / m)))
    while r ** m < codebook_size:
        r += 1
    while (r - 1) ** m >= codebook_size:
        r -= 1
    return [math.ceil(codebook_size / r ** (m - 1))] + [r] * (m - 1)


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention: (B, L, W) -> (B, L, W)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), drop=dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class SubcodeHead(nn.Module):
    """Logits of one digit from the hidden state and the digits before it.

    (B, L, W) hidden + list of (B, L) earlier digits -> (B, L, radix). The MLP lets the earlier
    digits interact with the context (a linear head over a sum would make them independent).
    """

    def __init__(self, width: int, radix: int, earlier: list[int], mlp_ratio: float) -> None:
        super().__init__()
        self.earlier = nn.ModuleList(nn.Embedding(n, width) for n in earlier)
        self.mlp = Mlp(width, int(width * mlp_ratio)) if earlier else None
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, radix)

    def forward(self, hidden: Tensor, digits: list[Tensor]) -> Tensor:
        if self.mlp is not None:
            hidden = hidden + sum(emb(d) for emb, d in zip(self.earlier, digits))
            hidden = hidden + self.mlp(hidden)
        return self.out(self.norm(hidden))


class ARProbe(nn.Module):
    """Decoder-only causal transformer over token ids, optionally class-conditional.

    Args:
        codebook_size: C, ids in [0, C).
        seq_len: L, the longest sequence (the tokens per image probed).
        num_classes: 0 for unconditional; else labels in [0, num_classes) select the first input,
            and the label ``num_classes`` (or labels=None) means "no class".
        width, depth, heads, mlp_ratio, dropout: transformer size (configs/probe/{tiny,small,base}.yaml).
        max_subcode: the largest softmax; larger codebooks are split into digits (:func:`subcode_sizes`).

    Shapes: tokens (B, L') long with L' <= L; labels (B,) long or None.
    """

    def __init__(self, codebook_size: int, seq_len: int, num_classes: int = 0, width: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0, max_subcode: int = 4096) -> None:
        super().__init__()
        if width % heads:
            raise VistokError(f"the probe's width {width} is not divisible by its {heads} heads; choose a width that is a multiple of heads.")
        self.codebook_size = int(codebook_size)
        self.seq_len = int(seq_len)
        self.num_classes = int(num_classes)
        self.radices = subcode_sizes(self.codebook_size, int(max_subcode))
        # place value of each digit: id = sum(digit_j * place_j)
        places = [math.prod(self.radices[j + 1:]) for j in range(len(self.radices))]
        self.register_buffer("places", torch.tensor(places, dtype=torch.long), persistent=False)
        self.token_embeddings = nn.ModuleList(nn.Embedding(r, width) for r in self.radices)
        # one embedding per class plus a last "no class" one: the start of unconditional sequences,
        # of conditional ones under class dropout, and of the linear probe's label-blind features
        self.start = nn.Embedding(self.num_classes + 1, width)
        self.position = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.blocks = nn.ModuleList(CausalBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleList(SubcodeHead(width, r, self.radices[:j], mlp_ratio) for j, r in enumerate(self.radices))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def factorised(self) -> bool:
        return len(self.radices) > 1

    def split(self, tokens: Tensor) -> list[Tensor]:
        """(B, L) ids -> one (B, L) tensor per digit, most significant first."""
        return [torch.div(tokens, p, rounding_mode="floor") % r for p, r in zip(self.places, self.radices)]

    def join(self, digits: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split`; ids past the codebook (possible when r^m > C) are clamped to C - 1."""
        return sum(d * p for d, p in zip(digits, self.places)).clamp_max(self.codebook_size - 1)

    def _check(self, tokens: Tensor, labels: Tensor | None) -> None:
        if tokens.ndim != 2 or tokens.is_floating_point() or not 1 <= tokens.shape[1] <= self.seq_len:
            raise VistokError(f"the probe takes (B, 1..{self.seq_len}) integer token ids, got {tuple(tokens.shape)} {tokens.dtype}.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise VistokError(f"token ids must lie in [0, {self.codebook_size}); pass ids of the probed tokenizer.")
        if labels is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise VistokError(f"class labels must lie in [0, {self.num_classes}) ({self.num_classes}: no class); pass labels of the data the probe was built for.")

    def _inputs(self, tokens: Tensor, labels: Tensor | None) -> Tensor:
        """(B, L') tokens -> (B, L', W) inputs: start/class embedding, then tokens 0..L'-2 shifted right."""
        b, n = tokens.shape
        if labels is None:
            first = self.start.weight[self.num_classes].expand(b, -1)
        else:
            first = self.start(labels.long())
        shifted = tokens[:, : n - 1]
        embedded = sum(emb(d) for emb, d in zip(self.token_embeddings, self.split(shifted)))
        x = torch.cat([first[:, None], embedded], dim=1) if n > 1 else first[:, None]
        return x + self.position[:, :n]

    def hidden(self, tokens: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(final normed hidden (B, L', W), the middle block's output (B, L', W)); the output at t predicts token t."""
        self._check(tokens, labels)
        x = self._inputs(tokens, labels)
        middle = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == (len(self.blocks) - 1) // 2:
                middle = x
        return self.norm(x), middle

    def nll(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """Negative log-likelihood in nats of each token given the ones before it: (B, L') float32.

        The sum of the digits' cross-entropies (teacher-forced), so ``nll / ln 2`` is bits per token
        and ``nll[:, :k].sum(1)`` the NLL of the prefix of length k.
        """
        hidden, _ = self.hidden(tokens, labels)
        digits = self.split(tokens)
        total = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        for j, head in enumerate(self.heads):
            logits = head(hidden, digits[:j]).float()
            total = total + F.cross_entropy(logits.transpose(1, 2), digits[j], reduction="none")
        return total

    def features(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, L') tokens -> (B, W): the middle block's output averaged over the token positions
        (GigaTok's linear probe reads a middle layer). For a linear probe pass labels=None: the
        "no class" start, so the features cannot simply echo the label."""
        _, middle = self.hidden(tokens, labels)
        return middle[:, 1:].mean(1) if middle.shape[1] > 1 else middle[:, 0]

    @torch.no_grad()
    def sample(self, num: int, labels: Tensor | None = None, *, length: int | None = None, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``num`` sequences of ``length`` (default L) ids: (num, length) long.

        Each digit is drawn from its head's softmax(logits / temperature), restricted to the
        ``top_k`` most likely values of that digit when given. The prefix is recomputed each step
        (no KV cache): cheap at probe sizes.
        """
        if temperature <= 0:
            raise VistokError(f"the sampling temperature must be positive, got {temperature}.")
        length = self.seq_len if length is None else length
        device = self.position.device
        tokens = torch.zeros(num, 0, dtype=torch.long, device=device)
        for t in range(length):
            # the input at position t needs tokens < t only; a dummy id fills the slot being predicted
            padded = torch.cat([tokens, tokens.new_zeros(num, 1)], dim=1)
            hidden, _ = self.hidden(padded, labels)
            h = hidden[:, t : t + 1]
            digits: list[Tensor] = []
            for j, head in enumerate(self.heads):
                logits = head(h, digits).float()[:, 0] / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    threshold = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < threshold, float("-inf"))
                digit = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                digits.append(digit)
            tokens = torch.cat([tokens, self.join(digits)], dim=1)
        return tokens
