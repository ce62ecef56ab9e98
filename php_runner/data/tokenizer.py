"""CLIP BPE tokenisation giving the official PHP/IRRA token ids, on open_clip's shipped vocabulary.

The sequence is ``[SOT] + bpe(text) + [EOT]``, zero-padded to ``context_length``; a longer one keeps
its first ``context_length`` ids with the last overwritten by EOT (spec 6). Text cleaning (ftfy,
double HTML unescape, whitespace collapse, lower case) and the BPE merges are open_clip's, which
match the official tokenizer id for id, with one difference: the official vocabulary drops the
last BPE merge and gives id 49405 to ``<|mask|>``, while open_clip keeps that merge at id 49405.
Only a word that BPE merges into exactly that string gets id 49405 here; the official code raises
a KeyError on it instead, so no caption that it can tokenise differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77


@cache
def _bpe():
    # Importing open_clip takes seconds; only code that tokenises pays for it.
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    if (tokenizer.sot_token_id, tokenizer.eot_token_id) != (SOT_ID, EOT_ID):
        raise RuntimeError(
            f"open_clip's tokenizer uses start/end ids {tokenizer.sot_token_id}/{tokenizer.eot_token_id}, "
            f"not the official {SOT_ID}/{EOT_ID}"
        )
    return tokenizer


def tokenize(text: str, context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """The official token ids of ``text``: a LongTensor of shape ``(context_length,)``."""
    ids = [SOT_ID] + _bpe().encode(text) + [EOT_ID]
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = EOT_ID
    result = torch.zeros(context_length, dtype=torch.long)
    result[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


def tokenize_all(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """``tokenize`` of every text, stacked to ``(len(texts), context_length)``; repeated texts are encoded once."""
    rows: dict[str, torch.Tensor] = {}
    for text in texts:
        if text not in rows:
            rows[text] = tokenize(text, context_length)
    if not texts:
        return torch.zeros(0, context_length, dtype=torch.long)
    return torch.stack([rows[text] for text in texts])
