"""The sequences of the logprob pass, in two layouts, and the one gather of their completion logprobs.

The learner scores, for every pair, prompt + chosen and prompt + rejected under the policy and the
reference. Two layouts hold those sequences for the model:

- `SeparateSequences`: one right-padded row per (prompt, completion) and a 2D padding mask; what
  any causal LM takes, so it is the fallback for models that cannot take the other layout's mask.
- `SharedPromptRows`: each prompt written once, followed by all its completions,

      [prompt][completion 0][completion 1]...      (one *group*; k completions, k = 2 for a pair)

  with a 4D attention mask in which a completion token sees the prompt and the earlier tokens of
  its own completion only, and position ids that restart at len(prompt) for every completion. Each
  completion token then computes what it computes as a separate sequence (same keys, same
  positions), so logprobs, loss and gradients equal the separate layout's up to float rounding,
  while the prompt runs once instead of once per completion. A mask rather than the prompt's KV
  cache reused per completion: one forward and one backward with no cache object in the graph, so
  gradient checkpointing (which turns the cache off in transformers), DeepSpeed ZeRO engines and
  PEFT models need nothing special; and the same mask packs several groups into one row (first-fit
  decreasing into rows as long as the longest group, positions restarting at 0 per group, the mask
  block-diagonal across groups), so padding is left only at row ends. The price is a dense (L x L)
  mask per row, with L at most the longest group. Padding tokens see only themselves (no
  all-masked softmax row, so no NaN).

Both layouts cut prompts by one rule (`truncate`) and index their completion tokens alike: token i
of the batch is predicted by the model's output at (`rows[i]`, `cols[i]`), its id is `targets[i]`,
and its logprob lands at (`sequences[i]`, `offsets[i]`) of an (S, C) output whose row s is
sequence s in block layout (completion j of prompt g is sequence j * G + g: for pairs, the chosen
rows, then the rejected rows). One gather, from hidden states or from logits, serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


# --------------------------------------------------------------------------------------------
# Truncation and groups
# --------------------------------------------------------------------------------------------
def truncate(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """The truncation rule of both layouts: the completion keeps its first `max_length` tokens and the
    prompt is cut from the left to fit, so the completion survives whole (config validation keeps
    completions within `max_length`). Returns the kept prompt and completion."""
    completion = list(completion)[:max_length]
    room = max_length - len(completion)
    return (list(prompt)[-room:] if room > 0 else []), completion


@dataclass
class Group:
    prompt: list[int]
    completions: list[list[int]]
    sequences: list[int]  # output row (sequence index) of each completion

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


def build_groups(prompts: list[list[int]], completions: list[list[list[int]]], max_length: int
                 ) -> tuple[list[Group], int]:
    """One group per prompt with its k completions, truncated by `truncate`; completion j of prompt g
    is sequence j * G + g. Completions whose prompts are cut differently cannot share one: such a
    group is split into one group per completion. Returns the groups and the number of sequences
    whose prompt was cut."""
    num = len(prompts)
    if len(completions) != num:
        raise ValueError("one list of completions per prompt")
    groups, truncated = [], 0
    for g, (prompt, samples) in enumerate(zip(prompts, completions)):
        kept = [truncate(prompt, completion, max_length) for completion in samples]
        truncated += sum(len(p) < len(prompt) for p, _ in kept)
        sequences = [j * num + g for j in range(len(samples))]
        if all(len(p) == len(kept[0][0]) for p, _ in kept):
            groups.append(Group(kept[0][0], [c for _, c in kept], sequences))
        else:
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


def longest_sequence(prompts: list[list[int]], completions: list[list[list[int]]], max_length: int) -> int:
    """Longest prompt + completion as a separate sequence (after truncation)."""
    return max((min(len(p) + len(c), max_length) for p, samples in zip(prompts, completions) for c in samples),
               default=0)


# --------------------------------------------------------------------------------------------
# The two layouts
# --------------------------------------------------------------------------------------------
@dataclass
class SequenceLayout:
    """Rows the model runs over, and where each completion token's logprob comes from (module doc)."""

    input_ids: torch.Tensor  # (R, L) long
    rows: torch.Tensor  # (M,) long
    cols: torch.Tensor  # (M,) long
    targets: torch.Tensor  # (M,) long
    sequences: torch.Tensor  # (M,) long
    offsets: torch.Tensor  # (M,) long
    num_sequences: int
    max_completion: int
    num_truncated_prompts: int

    @property
    def num_tokens(self) -> int:
        """Tokens the model runs over, padding included."""
        return self.input_ids.numel()

    def completion_mask(self) -> torch.Tensor:
        """(S, C) long: 1 where the output holds a completion token's logprob."""
        mask = torch.zeros(self.num_sequences, self.max_completion, dtype=torch.long)
        mask[self.sequences, self.offsets] = 1
        return mask

    def model_inputs(self, mask_dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward for these rows, on `device`."""
        raise NotImplementedError


@dataclass
class SeparateSequences(SequenceLayout):
    """One right-padded row per sequence, row s = sequence s."""

    attention_mask: torch.Tensor  # (R, L) long: 1 on real tokens
    # a vision-language batch: the pixel inputs of row s's prompt, stacked in row order (`stack_pixel_inputs`)
    pixel_inputs: dict[str, torch.Tensor] | None = None

    def model_inputs(self, mask_dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """input_ids, the 2D padding mask (`mask_dtype` concerns 4D masks only) and any pixel inputs."""
        inputs = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}
        for key, value in (self.pixel_inputs or {}).items():
            inputs[key] = value.to(device)
        return inputs


@dataclass
class SharedPromptRows(SequenceLayout):
    """Packed groups, each prompt once with its completions after it."""

    position_ids: torch.Tensor  # (R, L) long
    group_ids: torch.Tensor  # (R, L) long: group of each token (unique negative values for padding)
    segment_ids: torch.Tensor  # (R, L) long: 0 prompt, j + 1 completion j

    def attention_mask(self, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """(R, 1, L, L): bool (True = may attend) when `dtype` is None, else additive (0 / dtype's min)."""
        return attention_mask(self.group_ids.to(device), self.segment_ids.to(device), dtype)

    def model_inputs(self, mask_dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
        """input_ids, the restarting position ids and the 4D mask (bool for None, else additive)."""
        return {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device),
                "attention_mask": self.attention_mask(mask_dtype, device)}


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


def _place(row_groups: list[list[Group]], pad_token_id: int) -> dict:
    """Rows holding `row_groups`' groups left to right, right-padded to the longest row: token,
    position, group and segment ids, and the index of every completion token (module doc)."""
    shape = (len(row_groups), max(1, max((sum(len(g) for g in row) for row in row_groups), default=1)))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    group_ids = -1 - torch.arange(shape[1]).expand(shape).clone()  # padding: a group of its own per column
    segment_ids = torch.zeros(shape, dtype=torch.long)
    index: dict[str, list[int]] = {key: [] for key in ("rows", "cols", "targets", "sequences", "offsets")}
    num_sequences, max_completion = 0, 1
    for r, row in enumerate(row_groups):
        start = 0
        for group_index, group in enumerate(row):
            prompt_len = len(group.prompt)
            ids, positions, segments = list(group.prompt), list(range(prompt_len)), [0] * prompt_len
            for j, (completion, sequence) in enumerate(zip(group.completions, group.sequences)):
                first = start + len(ids)  # column of this completion's first token
                for t, token in enumerate(completion):
                    if t > 0 or prompt_len > 0:  # a token with nothing before it is not scored
                        predictor = first + t - 1 if t > 0 else start + prompt_len - 1
                        for key, value in zip(index, (r, predictor, token, sequence, t)):
                            index[key].append(value)
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
    return dict(input_ids=input_ids, position_ids=position_ids, group_ids=group_ids, segment_ids=segment_ids,
                num_sequences=num_sequences, max_completion=max_completion,
                **{key: torch.tensor(values, dtype=torch.long) for key, values in index.items()})


def separate_sequences(prompts: list[list[int]], completions: list[list[list[int]]], max_length: int,
                       pad_token_id: int, pixel_inputs: list[dict[str, torch.Tensor]] | None = None
                       ) -> SeparateSequences:
    """Completion j of prompt g after its (truncated) prompt, alone in row j * G + g. `pixel_inputs`
    (a vision-language batch, one dict per prompt): row j * G + g gets prompt g's."""
    groups, truncated = build_groups(prompts, completions, max_length)
    singles = sorted((Group(g.prompt, [c], [s]) for g in groups for c, s in zip(g.completions, g.sequences)),
                     key=lambda single: single.sequences[0])
    placed = _place([[single] for single in singles], pad_token_id)
    del placed["position_ids"], placed["segment_ids"]  # the model counts positions itself in a row of its own
    rows_pixels = None
    if pixel_inputs is not None:
        rows_pixels = stack_pixel_inputs(pixel_inputs, [s % len(prompts) for s in range(placed["num_sequences"])])
    return SeparateSequences(attention_mask=(placed.pop("group_ids") >= 0).long(), num_truncated_prompts=truncated,
                             pixel_inputs=rows_pixels, **placed)


def stack_pixel_inputs(per_prompt: list[dict[str, torch.Tensor]], order: list[int]) -> dict[str, torch.Tensor]:
    """The pixel inputs of the prompts `order` names (one entry per model row, in row order; prompt p's
    inputs have batch dimension 1 per image group), concatenated along dimension 0. Tensors that
    differ past dimension 0 (images of other sizes, other image counts) are zero-padded to the
    largest: zero pixels under a zero `pixel_attention_mask`, the processors' own padding."""
    stacked = {}
    for key in per_prompt[order[0]] if order else ():
        parts = [per_prompt[p][key] for p in order]
        shape = [max(sizes) for sizes in zip(*(part.shape[1:] for part in parts))]
        padded = []
        for part in parts:
            missing = [size - have for size, have in zip(shape, part.shape[1:])]
            if any(missing):  # F.pad takes (last dim left, right, second-to-last left, right, ...)
                part = torch.nn.functional.pad(part, [x for gap in reversed(missing) for x in (0, gap)])
            padded.append(part)
        stacked[key] = torch.cat(padded)
    return stacked


def shared_prompt_rows(prompts: list[list[int]], completions: list[list[list[int]]], max_length: int,
                       pad_token_id: int) -> SharedPromptRows:
    """Each prompt once with all its completions, groups packed into rows (module doc)."""
    groups, truncated = build_groups(prompts, completions, max_length)
    return SharedPromptRows(num_truncated_prompts=truncated, **_place(pack_rows(groups), pad_token_id))


# --------------------------------------------------------------------------------------------
# The gather: logprobs of the completion tokens, (S, C) fp32, zero off completions
# --------------------------------------------------------------------------------------------
def _picked_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()  # (chunk, V) in fp32: a low-precision log-softmax would be off by ~1e-2
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _project_logprobs(project, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _picked_logprobs(project(states), targets)  # (chunk, V): the only vocabulary-wide tensor


def _gather(layout: SequenceLayout, device, chunk_tokens: int, chunk_logprobs) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_logprobs(start, end)` over the completion tokens `chunk_tokens` at a time, scattered to
    (S, C) fp32 logprobs; returned with the (S, C) completion mask."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    parts = [chunk_logprobs(start, start + chunk_tokens) for start in range(0, layout.targets.shape[0], chunk_tokens)]
    out = torch.zeros(layout.num_sequences, layout.max_completion, dtype=torch.float32, device=device)
    if parts:
        out = out.index_put((layout.sequences.to(device), layout.offsets.to(device)), torch.cat(parts))
    return out, layout.completion_mask().to(device)


def logprobs_from_hidden(hidden: torch.Tensor, project, layout: SequenceLayout, chunk_tokens: int = 256):
    """Completion-token logprobs from the final hidden states (R, L, H) and the output layer `project`,
    which runs on the predicting positions only, `chunk_tokens` at a time: no (R, L, V) tensor is
    made. Under autograd each chunk is checkpointed (its logits recomputed in backward rather than
    kept), so the peak stays a few (chunk, V) tensors for the whole batch. Returns fp32 (S, C)
    logprobs, zero off completions, and the (S, C) mask."""
    device = hidden.device
    states = hidden[layout.rows.to(device), layout.cols.to(device)]  # (M, H)
    targets = layout.targets.to(device)
    grad = torch.is_grad_enabled() and states.requires_grad

    def chunk_logprobs(start: int, end: int) -> torch.Tensor:
        args = (project, states[start:end], targets[start:end])
        return checkpoint(_project_logprobs, *args, use_reentrant=False) if grad else _project_logprobs(*args)

    return _gather(layout, device, chunk_tokens, chunk_logprobs)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Every next token's logprob, out[:, t] = log p(input_ids[:, t + 1] | prefix), (N, T-1) fp32, one
    row at a time: for probe sequences scored whole, outside any layout."""
    return torch.stack([_picked_logprobs(row[:-1], ids[1:]) for row, ids in zip(logits, input_ids)])


def logprobs_from_logits(logits: torch.Tensor, layout: SequenceLayout, chunk_tokens: int = 256):
    """The same from the model's full logits (R, L, V): an fp32 log-softmax over `chunk_tokens`
    gathered positions at a time, never over the whole (R, L, V)."""
    device = logits.device
    rows, cols, targets = layout.rows.to(device), layout.cols.to(device), layout.targets.to(device)
    return _gather(layout, device, chunk_tokens,
                   lambda start, end: _picked_logprobs(logits[rows[start:end], cols[start:end]], targets[start:end]))
