"""Held-out loss and bits per byte, and sampling."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from gigatrain.models.loss import loss_fn
from gigatrain.parallel.device import autocast


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
              dtype: torch.dtype | None) -> float:
    """Mean loss per token over the batches (nats)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            logits = model(inputs)
        total += loss_fn(logits, targets, reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total / max(1, count)


def bits_per_byte(loss_nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent: the total code length of the text in bits over its UTF-8 bytes."""
    return loss_nats_per_token * tokens / (math.log(2) * n_bytes)


def document_stream(documents: list[str], tokenizer) -> tuple[np.ndarray, int]:
    """Token stream [eot] + doc for each document, and the bytes its predicted tokens stand for.

    Every token after the first is predicted: the documents' own tokens, and the
    separators between documents, each counted as one byte (as a newline would be).
    """
    stream = tokenizer.encode_documents(documents, np.int64)  # the stream `prepare` writes
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents) + len(documents) - 1
    return stream, n_bytes


def stream_windows(stream: np.ndarray, seq_len: int, batch_size: int):
    """Cover every position of the stream exactly once: windows of seq_len + 1 tokens that
    overlap by one; the short last window goes in a batch of its own."""
    n_full = (len(stream) - 1) // seq_len
    starts = np.arange(n_full) * seq_len
    for i in range(0, n_full, batch_size):
        window = np.stack([stream[s : s + seq_len + 1] for s in starts[i : i + batch_size]])
        yield torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
    tail = stream[n_full * seq_len :]
    if len(tail) > 1:
        tail = torch.from_numpy(tail[None, :].copy())
        yield tail[:, :-1], tail[:, 1:]


def evaluate_text(model: nn.Module, documents: list[str], tokenizer, seq_len: int, batch_size: int,
                  device: torch.device, dtype: torch.dtype | None) -> dict:
    stream, n_bytes = document_stream(documents, tokenizer)
    if len(stream) < 2 or n_bytes <= 0:
        raise ValueError("the text to evaluate is empty")
    tokens = len(stream) - 1
    loss = mean_loss(model, stream_windows(stream, seq_len, batch_size), device, dtype)
    return {"loss": loss, "bits_per_byte": bits_per_byte(loss, tokens, n_bytes), "tokens": tokens, "bytes": n_bytes}


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float, top_k: int,
             context_len: int, device: torch.device, dtype: torch.dtype | None,
             generator: torch.Generator | None = None, stop_id: int | None = None) -> list[int]:
    """Sample a continuation, ending early at `stop_id` (not returned); temperature 0 is greedy.
    Re-runs the context each token, which is simple and fast enough for the small models that
    sample on a CPU."""
    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-context_len:]], dtype=torch.long, device=device)
        with autocast(device, dtype):
            logits = model(context)[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if next_id == stop_id:
            break
        ids.append(next_id)
    model.train(was_training)
    return ids[len(prompt_ids):]


def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """The prompt and a sampled continuation of it, as a new document: it starts after an eot,
    as every document does in training, and ends at the next eot."""
    prompt_ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
    new_ids = generate(model, prompt_ids, max_new_tokens, stop_id=tokenizer.eot_id, **kwargs)
    return prompt + tokenizer.decode(new_ids)
