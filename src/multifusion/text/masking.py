"""Masked-language-modelling targets: BERT's 80/10/10 rule, token- or whole-word level.

Every non-special token (or, with whole-word masking, every word: all its WordPiece
pieces together) is selected with probability ``mask_prob``; of the selected tokens 80 %
become ``[MASK]``, 10 % a random token, 10 % stay. Each sequence gets at least one
selected token so that no batch is ever without a target. All randomness comes from the
caller's ``torch.Generator``: the same generator state gives the same masks.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of tokens the loss skips (torch.nn.functional.cross_entropy default)


def select_positions(
    word_ids: torch.Tensor,
    candidates: torch.Tensor,
    mask_prob: float,
    whole_word: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Positions to predict. word_ids (B, L) long (-1 outside words), candidates (B, L) bool -> (B, L) bool."""
    B, L = word_ids.shape
    if whole_word:
        n_words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
        word_scores = torch.rand(B, max(n_words, 1), generator=generator)   # (B, W)
        scores = word_scores.gather(1, word_ids.clamp(min=0))              # (B, L): one draw per word
    else:
        scores = torch.rand(B, L, generator=generator)                     # (B, L): one draw per token
    scores = scores.masked_fill(~candidates, float("inf"))
    selected = scores < mask_prob                                          # (B, L)

    # Sequences where nothing was drawn: take the token (word) with the lowest score.
    empty = ~selected.any(dim=1) & candidates.any(dim=1)                   # (B,)
    if empty.any():
        lowest = scores.argmin(dim=1, keepdim=True)                        # (B, 1)
        if whole_word:
            forced = (word_ids == word_ids.gather(1, lowest)) & candidates
        else:
            forced = torch.zeros_like(selected).scatter_(1, lowest, True)
        selected = selected | (forced & empty[:, None])
    return selected


def mask_tokens(
    input_ids: torch.Tensor,
    word_ids: torch.Tensor,
    special: torch.Tensor,
    mask_prob: float,
    whole_word: bool,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, L), word_ids (B, L), special (B, L) bool -> (masked input_ids, labels), both (B, L).

    ``special`` is True at [CLS]/[SEP]/padding, which are never selected. Labels hold the
    original id at selected positions and ``IGNORE_INDEX`` elsewhere.
    """
    selected = select_positions(word_ids, ~special, mask_prob, whole_word, generator)  # (B, L)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)

    action = torch.rand(input_ids.shape, generator=generator)                         # (B, L)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)      # (B, L)
    masked = input_ids.clone()
    masked[selected & (action < 0.8)] = mask_token_id
    to_random = selected & (action >= 0.8) & (action < 0.9)
    masked[to_random] = random_ids[to_random]
    return masked, labels
