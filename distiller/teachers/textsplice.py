"""CLIP text features of prompts with a pseudo-word spliced into the token embeddings.

A pseudo-word is a vector in the text encoder's token-embedding space. It replaces the
embedding of a placeholder token ("*") before the transformer; the rest is the model's own
``encode_text``: positional embeddings, causal transformer, final LayerNorm, pooling as the
model's ``text_pool_type`` says, projection. Under the causal mask, positions before the end
token never see what comes after it, so truncating the context to the longest prompt is exact
(and several times faster on a CPU); pooling types that read the padding are not truncated.
"""
from __future__ import annotations

import torch

from runtime.errors import UserError

PLACEHOLDER = "*"


class SplicedText:
    def __init__(self, model, tokenizer):
        if not hasattr(model, "token_embedding") or not hasattr(model, "transformer"):
            raise UserError("prompt styles need an open_clip CLIP-style text tower (with token_embedding): "
                            "use --prompts plain with this teacher")
        self.model, self.tokenizer = model, tokenizer
        self.table = model.token_embedding.weight.detach()
        self.dim = self.table.shape[1]
        self.pool = getattr(model, "text_pool_type", "argmax")
        ids = tokenizer([PLACEHOLDER])[0]
        self.placeholder_id = int(ids[1])

    @property
    def device(self):
        return self.table.device

    def tokens(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def word_embedding(self, word: str) -> torch.Tensor:
        """Mean token embedding of a word's tokens (no start/end tokens)."""
        ids = self.tokenizer([word])[0]
        end = int(ids.argmax())
        return self.table[ids[1:end].to(self.device)].mean(0)

    def encode(self, tokens: torch.Tensor, pseudo: torch.Tensor | None = None, truncate: bool = True) -> torch.Tensor:
        """Text features [N, D] (not normalised). ``pseudo`` [N, d] replaces each row's placeholder."""
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast)
        if pseudo is not None:
            mask = tokens == self.placeholder_id
            if not bool((mask.sum(1) == 1).all()):
                raise ValueError("every prompt needs exactly one placeholder token")
            x = torch.where(mask.unsqueeze(-1), pseudo.to(cast).unsqueeze(1).expand_as(x), x)
        n = tokens.shape[1]
        if truncate and self.pool in ("argmax", "eos", "first"):
            n = int(tokens.argmax(-1).max()) + 1
        x = x[:, :n] + m.positional_embedding[:n].to(cast)
        mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        from open_clip.transformer import text_global_pool
        x = text_global_pool(x, tokens[:, :n], self.pool, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x
