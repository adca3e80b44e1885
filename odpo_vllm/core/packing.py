"""Shared-prompt, padding-free rows for the logprob pass, as pure functions of token lists and tensors.

The learner scores, for every pair, prompt + chosen and prompt + rejected under the policy and the
reference. Run as separate padded sequences, that is the prompt four times per pair and every row
padded to the longest of the micro-batch. Here each prompt is written once, followed by all its
completions:

    [prompt][completion 0][completion 1]...      (one *group*; k completions, k = 2 for a pair)

with a 4D attention mask in which a completion token sees the prompt and the earlier tokens of
its own completion only, and position ids that restart at len(prompt) for every completion. Each
completion token then computes exactly what it computes in its own sequence (same keys, same
positions), so logprobs, loss and gradients equal the separate-sequence pass up to float rounding.

Why one sequence with a mask rather than the prompt's KV cache reused for each completion: it is
one forward and one backward per model with no cache object in the graph, so gradient
checkpointing (which turns the cache off in transformers), DeepSpeed ZeRO-2/3 engines (their
forward takes keyword arguments through) and PEFT models need nothing special; and the same mask
also packs several groups into one row, which removes padding (below). The price is a dense
(L x L) mask per row: attention is computed over the whole row and masked, so rows are capped at
the longest group of the micro-batch (a row never costs more attention than the longest group
would alone).

Packing: groups are placed first-fit-decreasing into rows of capacity = the longest group, each
group's positions restarting at 0, the mask block-diagonal across groups; rows are padded only to
the longest row. Padding tokens see only themselves (no all-masked softmax row, so no NaN).

A group whose completions keep different prompt lengths after `max_length` truncation (the prompt
is cut from the left per completion) is split into one group per completion, so the truncation is
exactly the separate-sequence one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Group:
    prompt: list[int]
    completions: list[list[int]]
    sequences: list[int]  # output row (sequence index) of each completion

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


@dataclass
class SharedPromptRows:
    """Packed rows and where each completion token's logprob comes from.

    Completion token i of the batch is predicted by the hidden state at (`rows[i]`, `cols[i]`), its
    id is `targets[i]`, and its logprob goes to (`sequences[i]`, `offsets[i]`) of the (S, C) output.
    """

    input_ids: torch.Tensor  # (R, L) long
    position_ids: torch.Tensor  # (R, L) long
    group_ids: torch.Tensor  # (R, L) long: group of each token (unique negative values for padding)
    segment_ids: torch.Tensor  # (R, L) long: 0 prompt, j + 1 completion j
    rows: torch.Tensor  # (M,)
    cols: torch.Tensor  # (M,)
    targets: torch.Tensor  # (M,)
    sequences: torch.Tensor  # (M,)
    offsets: torch.Tensor  # (M,)
    num_sequences: int
    max_completion: int
    num_truncated_prompts: int

    @property
    def num_tokens(self) -> int:
        """Tokens the model runs over, padding included."""
        return self.input_ids.numel()

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(R, 1, L, L): bool (True = may attend) when `dtype` is None, else additive (0 / dtype's min)."""
        return attention_mask(self.group_ids, self.segment_ids, dtype)

    def completion_mask(self) -> torch.Tensor:
        """(S, C) long: 1 where the output holds a completion token's logprob."""
        mask = torch.zeros(self.num_sequences, self.max_completion, dtype=torch.long)
        mask[self.sequences, self.offsets] = 1
        return mask


def build_groups(prompts: list[list[int]], completions: list[list[list[int]]], max_length: int
                 ) -> tuple[list[Group], int]:
    """One group per prompt with its k completions; output sequence of completion j of prompt g is
    j * G + g (block layout, so for pairs: chosen rows, then rejected rows). Truncation is that of
    `objective.pack_sequences`: the completion keeps its first `max_length` tokens, the prompt is
    cut from the left to fit. Returns the groups and the number of (prompt, completion) sequences
    whose prompt was cut."""
    num = len(prompts)
    if len(completions) != num:
        raise ValueError("one list of completions per prompt")
    groups, truncated = [], 0
    for g, (prompt, samples) in enumerate(zip(prompts, completions)):
        kept = []
        for completion in samples:
            completion = list(completion)[:max_length]
            room = max_length - len(completion)
            kept_prompt = list(prompt)[-room:] if room > 0 else []
            truncated += len(kept_prompt) < len(prompt)
            kept.append((kept_prompt, completion))
        sequences = [j * num + g for j in range(len(samples))]
        if all(len(p) == len(kept[0][0]) for p, _ in kept):
            groups.append(Group(kept[0][0], [c for _, c in kept], sequences))
        else:  # different prompt cuts: each completion with its own prompt (exactly the separate pass)
            groups += [Group(p, [c], [s]) for (p, c), s in zip(kept, sequences)]
    return groups, truncated


def pack_rows(groups: list[Group]) -> list[list[Group]]:
    """First-fit decreasing into rows of capacity = the longest group (stable for equal lengths)."""
    if not groups:
        return []
    capacity = max(len(g) for g in groups)
    rows: list[list[Group]] = []
    used: list[int] = []
    for group in sorted(groups, key=len, reverse=True):
        for r, length in enumerate(used):
            if length + len(group) <= capacity:
                rows[r].append(group)
                used[r] += len(group)
                break
        else:
            rows.append([group])
            used.append(len(group))
    return rows


def shared_prompt_rows(prompts: list[list[int]], completions: list[list[list[int]]], max_length: int,
                       pad_token_id: int, pack: bool = True) -> SharedPromptRows:
    """The rows of a micro-batch: each prompt once with all its completions (see the module doc).
    `pack=False` puts one group per row (padded to the longest group)."""
    groups, truncated = build_groups(prompts, completions, max_length)
    layout = pack_rows(groups) if pack else [[g] for g in groups]
    width = max((sum(len(g) for g in row) for row in layout), default=1)
    shape = (len(layout), max(width, 1))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    group_ids = -1 - torch.arange(shape[1]).expand(shape).clone()  # padding: a group of its own per column
    segment_ids = torch.zeros(shape, dtype=torch.long)
    rows, cols, targets, sequences, offsets = [], [], [], [], []
    num_sequences, max_completion = 0, 1
    for r, row in enumerate(layout):
        start = 0
        for group_index, group in enumerate(row):
            prompt_len = len(group.prompt)
            ids = list(group.prompt)
            positions = list(range(prompt_len))
            segments = [0] * prompt_len
            for j, (completion, sequence) in enumerate(zip(group.completions, group.sequences)):
                first = start + len(ids)  # column of this completion's first token
                for t, token in enumerate(completion):
                    predictor = first + t - 1 if t > 0 else start + prompt_len - 1
                    if t > 0 or prompt_len > 0:  # a token with nothing before it is not scored
                        rows.append(r)
                        cols.append(predictor)
                        targets.append(token)
                        sequences.append(sequence)
                        offsets.append(t)
                ids += completion
                positions += range(prompt_len, prompt_len + len(completion))
                segments += [j + 1] * len(completion)
                num_sequences = max(num_sequences, sequence + 1)
                max_completion = max(max_completion, len(completion))
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, start:end] = torch.tensor(positions, dtype=torch.long)
            group_ids[r, start:end] = group_index
            segment_ids[r, start:end] = torch.tensor(segments, dtype=torch.long)
            start = end
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SharedPromptRows(input_ids, position_ids, group_ids, segment_ids, as_long(rows), as_long(cols),
                            as_long(targets), as_long(sequences), as_long(offsets), num_sequences,
                            max_completion, truncated)


def attention_mask(group_ids: torch.Tensor, segment_ids: torch.Tensor, dtype: torch.dtype | None = None):
    """Query q may see key k iff same group, k not after q, and k is in the prompt or q's segment."""
    columns = torch.arange(group_ids.shape[1], device=group_ids.device)
    causal = columns[None, :] <= columns[:, None]  # (L_q, L_k)
    same_group = group_ids[:, :, None] == group_ids[:, None, :]
    visible_segment = (segment_ids[:, None, :] == 0) | (segment_ids[:, :, None] == segment_ids[:, None, :])
    allowed = (same_group & visible_segment & causal)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=group_ids.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------
# Logprobs of the gathered completion tokens
# --------------------------------------------------------------------------------------------
def _picked_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _project_logprobs(project, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _picked_logprobs(project(states), targets)  # (chunk, V): the only vocabulary-wide tensor


def _scatter(layout: SharedPromptRows, parts: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(layout.num_sequences, layout.max_completion, dtype=torch.float32, device=device)
    if parts:
        out = out.index_put((layout.sequences.to(device), layout.offsets.to(device)), torch.cat(parts))
    return out, layout.completion_mask().to(device)


def shared_logprobs_from_hidden(hidden: torch.Tensor, project, layout: SharedPromptRows, chunk_tokens: int = 256):
    """Completion-token logprobs from the final hidden states (R, L, H): the output layer `project`
    runs on the predicting positions only, `chunk_tokens` at a time, each chunk checkpointed under
    autograd (as `objective.completion_logprobs_from_hidden`). Returns fp32 (S, C) logprobs, zero
    off completions, and the (S, C) mask; row s is output sequence s (block layout)."""
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = hidden.device
    states = hidden[layout.rows.to(device), layout.cols.to(device)]  # (M, H)
    targets = layout.targets.to(device)
    grad = torch.is_grad_enabled() and states.requires_grad
    parts = []
    for start in range(0, states.shape[0], chunk_tokens):
        chunk = (project, states[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        parts.append(checkpoint(_project_logprobs, *chunk, use_reentrant=False) if grad else _project_logprobs(*chunk))
    return _scatter(layout, parts, device)


def shared_logprobs_from_logits(logits: torch.Tensor, layout: SharedPromptRows, chunk_tokens: int = 256):
    """The same from full logits (R, L, V): fp32 log-softmax on `chunk_tokens` gathered positions at a time."""
    device = logits.device
    rows, cols, targets = layout.rows.to(device), layout.cols.to(device), layout.targets.to(device)
    parts = [_picked_logprobs(logits[rows[s : s + chunk_tokens], cols[s : s + chunk_tokens]],
                              targets[s : s + chunk_tokens])
             for s in range(0, rows.shape[0], chunk_tokens)]
    return _scatter(layout, parts, device)


def longest_sequence(prompts: list[list[int]], completions: list[list[list[int]]], max_length: int) -> int:
    """Longest prompt + completion as a separate sequence would be (after truncation)."""
    return max((min(len(p) + len(c), max_length) for p, samples in zip(prompts, completions) for c in samples),
               default=0)
