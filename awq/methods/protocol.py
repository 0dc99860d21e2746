"""Evaluation protocols: which tokens of a window are scored, and what the sparsity method sees of them.

* ``standard`` (the paper's): every window is one forward pass with the method active; every next-token
  prediction of the window is scored (``T - 1`` targets per window of ``T`` tokens).
* ``prompt:P`` (prompt -> continuation): the first ``P`` tokens of each window are a *prompt*, run with
  every MLP **dense** (the prefill of a generation); the remaining ``T - P`` tokens run with the method
  active, attending to the prompt's (dense) keys and values through the KV cache.  Scored: the
  predictions made by the continuation forward, i.e. targets ``P+1 .. T-1`` (``T - P - 1`` per window),
  every one of them computed with the method active.  Dense measured under the same protocol scores the
  same tokens, so PPL / KL / top-1 of every method on a prompt-protocol frontier compare like for like.

**How a method sees the prompt** (the hook; :class:`awq.methods.base.SwappedMLP` has both as no-ops):

* ``observe_prompt(x, h)``: during the prompt, each swapped MLP is temporarily replaced by a dense
  stand-in (:class:`DensePromptMLP`) that computes the *original* MLP and calls its swapped module's
  ``observe_prompt`` with the prompt's MLP input ``x [B, P, H]`` and intermediate activation
  ``h = act(gate(x)) * up(x)`` ``[B, P, F]`` (row ``b`` = sequence ``b`` of the batch).  A method that
  chooses neurons from the prompt (GRIFFIN-style sequence-level sets) computes and keeps its per-sequence
  choice here.  It may be called more than once before the continuation (a prompt run in chunks):
  accumulate.
* then the continuation calls the module's ordinary ``forward`` with ``[B, T-P, H]``: one fixed set per
  sequence can still be applied batched (index row ``b`` of the kept state);
* ``end_sequence()``: called after each batch of windows; drop the per-sequence state.

A method that cannot run without a prompt sets ``needs_prompt = True`` (a class attribute of its module,
or an attribute of its config / method spec): ``awq.experiments.frontier`` refuses it under the standard protocol.
The prompt phase is not metered (the prefill reads every weight anyway); the read fraction of a point is
that of the continuation tokens.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from awq.load.arch import decoder_layers, is_swapped
from awq.methods.base import base_mlp

STANDARD = "standard"


class ProtocolError(ValueError):
    """A bad --protocol value (one line)."""


@dataclass(frozen=True)
class Protocol:
    """``prompt_tokens == 0``: the standard protocol; else ``prompt:P``."""

    prompt_tokens: int = 0

    @property
    def name(self) -> str:
        return STANDARD if self.prompt_tokens == 0 else f"prompt:{self.prompt_tokens}"

    @property
    def first_scored(self) -> int:
        """Position of the first scored prediction (it predicts the token at ``first_scored + 1``)."""
        return self.prompt_tokens

    def scored_targets(self, seqlen: int) -> int:
        return seqlen - 1 - self.prompt_tokens

    def check(self, seqlen: int) -> "Protocol":
        if self.prompt_tokens and not (1 <= self.prompt_tokens <= seqlen - 2):
            raise ProtocolError(f"--protocol {self.name}: the prompt must leave at least 2 of the {seqlen} window "
                                f"tokens to score (1 <= P <= {seqlen - 2})")
        return self

    @classmethod
    def parse(cls, text: "str | Protocol | None") -> "Protocol":
        """``None`` / ``"standard"`` -> standard; ``"prompt:P"`` (P a positive integer) -> prompt protocol."""
        if isinstance(text, Protocol):
            return text
        s = (text or STANDARD).strip().lower()
        if s == STANDARD:
            return cls(0)
        kind, _, num = s.partition(":")
        if kind != "prompt" or not num.strip().isdigit() or int(num) < 1:
            raise ProtocolError(f"--protocol {text!r}: use 'standard' or 'prompt:P' with P >= 1 prompt tokens")
        return cls(int(num))


def check_protocol(text: str) -> Protocol:
    """The ``--protocol`` option's check (its value parses; the window length is checked where it is known)."""
    return Protocol.parse(text)


class DensePromptMLP(nn.Module):
    """Stand-in for a swapped MLP during the prompt: the original MLP, dense, showing its inputs to the method."""

    def __init__(self, swapped: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "swapped", swapped)  # unregistered: not a submodule of the stand-in
        object.__setattr__(self, "dense", base_mlp(swapped))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.dense
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        y = m.down_proj(h)
        self.swapped.observe_prompt(x, h)
        return y


@contextlib.contextmanager
def prompt_phase(model: nn.Module) -> Iterator[int]:
    """Every swapped MLP runs dense (and sees its inputs, ``observe_prompt``) inside the ``with`` block.

    Yields the number of swapped MLPs (0 for a dense model: nothing changes)."""
    swapped = [(layer, layer.mlp) for layer in decoder_layers(model) if is_swapped(layer.mlp)]
    for layer, mod in swapped:
        layer.mlp = DensePromptMLP(mod)
    try:
        yield len(swapped)
    finally:
        for layer, mod in swapped:
            layer.mlp = mod


def end_sequence(model: nn.Module) -> None:
    """Tell every swapped MLP that the current sequences are finished (``end_sequence()``)."""
    for layer in decoder_layers(model):
        if is_swapped(layer.mlp):
            layer.mlp.end_sequence()


def needs_prompt(model: nn.Module) -> list[str]:
    """Class names of the swapped MLPs that cannot run without a prompt (``needs_prompt = True``)."""
    return sorted({type(layer.mlp).__name__ for layer in decoder_layers(model)
                   if is_swapped(layer.mlp) and getattr(layer.mlp, "needs_prompt", False)})


@torch.no_grad()
def window_logits(model: nn.Module, ids: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """Logits ``[B, T - 1 - P, V]`` of the scored predictions of windows ``ids [B, T]`` (position ``P + j``
    predicts token ``P + j + 1``).  Standard: one forward.  ``prompt:P``: the prompt dense with the KV
    cache, then the continuation with the method active; ``end_sequence()`` after it."""
    P = protocol.prompt_tokens
    if P == 0:
        return model(ids, use_cache=False).logits[:, :-1]
    protocol.check(ids.size(1))
    try:
        with prompt_phase(model):
            out = model(ids[:, :P], use_cache=True)
        logits = model(ids[:, P:], past_key_values=out.past_key_values, use_cache=True).logits
    finally:
        end_sequence(model)
    return logits[:, :-1]
