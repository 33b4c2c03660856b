"""Router gate vectors, computed as mergekit-moe 0.1.5 computes them (``moe/router.py:get_gate_params``).

Result: ``[num_layers, num_gated_experts, hidden_size]``. Modes:

- ``hidden`` / ``hidden_last``: the base model (transformers, bf16, on ``device``) runs each prompt set --
  tokenized as ``bos_token + prompt``, no other special tokens, left-padded with pad = bos (eos when there is
  no bos) -- with ``output_hidden_states``; ``hidden_states[:-1]`` (the residual stream entering each layer),
  last token, mean over the prompts; the negative prompts' mean is subtracted; each layer's vector is
  L2-normalised (norm clamped at 1e-8). Every operation is mergekit's, in bf16 on the same device, so the
  gates are bit-identical: ``--device cpu`` to mergekit-moe's default, ``--device cuda`` to
  ``mergekit-moe --cuda`` (the default ``auto`` uses the GPU when there is one). One forward per prompt set, like mergekit: batching several sets together would
  change the left padding and hence the position ids, and so the numbers.
- ``hidden_avg``: the same with the mean over all positions (pads included), as mergekit.
- ``cheap_embed``: the base model's ``model.embed_tokens.weight`` rows for the tokens, in fp32, summed over
  the unpadded tokens of all prompts, normalised; negatives subtracted and normalised again; the same vector
  for every layer. (mergekit multiplies a one-hot matrix by the whole embedding in fp32; gathering the rows
  gives the same values exactly and reads only the rows used.)
- ``random``: ``randn``; ``uniform_random``: ``U(-1/sqrt(H), 1/sqrt(H))`` (``rand * 2 * s - s``), in fp32.
  With a seed they equal mergekit's with the same ``--random-seed`` (torch's CPU generator seeded with it,
  these being its first draws).

Only one copy of the base model is held, and it is freed before the function returns.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
from collections.abc import Sequence

import torch

from mergekit_fast.config import ConfigError
from mergekit_fast.io.model import ModelSource
from mergekit_fast.moe.config import HIDDEN_MODES, Expert

LOG = logging.getLogger(__name__)


def load_tokenizer(base_model: str, *, required: bool, trust_remote_code: bool = False):
    """The base model's tokenizer set up as mergekit-moe does (left padding, pad = bos, else eos).
    Returns None when it cannot be loaded and ``required`` is False."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        if required:
            raise ConfigError(f"base_model: cannot load the tokenizer of {base_model} ({exc})") from None
        LOG.warning(
            "base_model: cannot load the tokenizer of %s (%s); no tokenizer will be written", base_model, exc
        )
        return None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize_prompts(prompts: Sequence[str], tokenizer):
    """mergekit's tokenize_prompts."""
    if len(prompts) > 1 and tokenizer.pad_token_id is None:
        raise ConfigError("base_model: the tokenizer has neither a bos nor an eos token to pad prompts with")
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def _hidden_states(model, tokenized, average: bool) -> torch.Tensor:
    """mergekit's get_hidden_states: [num_layers, hidden] in the model's dtype."""
    with torch.no_grad():
        output = model(**tokenized.to(model.device), output_hidden_states=True, return_dict=True)
    hidden_states = torch.stack(output.hidden_states[:-1])  # (layers, batch, seq, hidden)
    if average:
        hidden_states = hidden_states.sum(dim=2) / hidden_states.shape[2]
    else:
        hidden_states = hidden_states[:, :, -1, :]
    return hidden_states.sum(dim=1) / hidden_states.shape[1]


def _cheap_embedding(embed: torch.Tensor, tokenized, num_layers: int, vocab_size: int) -> torch.Tensor:
    """mergekit's get_cheap_embedding with the one-hot product replaced by a row gather (same values)."""
    ids = tokenized["input_ids"]
    if ids.numel() and (
        int(ids.max()) >= vocab_size or int(ids.max()) >= embed.shape[0] or int(ids.min()) < 0
    ):
        raise ConfigError(
            f"base_model: the tokenizer produced token id {int(ids.max())}, beyond the embedding "
            f"({embed.shape[0]} rows, vocab_size {vocab_size})"
        )
    h = embed[ids].float()  # (batch, seq, hidden): one_hot(ids).float() @ embed.float(), exactly
    embedded = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    res = embedded / embedded.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return res.repeat(num_layers, 1)


def _progress(total: int, show: bool | None):
    from tqdm import tqdm

    disable = not (show if show is not None else sys.stderr.isatty())
    return tqdm(total=total, desc="gate prompts", unit="set", file=sys.stderr, disable=disable)


def compute_gates(
    mode: str,
    experts: Sequence[Expert],
    base: ModelSource,
    tokenizer,
    *,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    progress: bool | None = None,
    trust_remote_code: bool = False,
) -> torch.Tensor:
    """Gate vectors ``[num_layers, len(experts), hidden_size]`` (bf16 for the hidden modes, else fp32)."""
    cfg = base.config.get("text_config") or base.config
    num_layers, hidden = base.num_layers, cfg.get("hidden_size")
    if not isinstance(hidden, int):
        raise ConfigError(f"base_model: {base.path / 'config.json'} has no integer hidden_size")
    shape = (num_layers, len(experts), hidden)
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    if mode == "random":
        return torch.randn(shape, generator=gen)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=gen) * 2 * scale - scale

    if mode == "cheap_embed":
        name = "model.embed_tokens.weight"
        info = base.tensors.get(name)
        if info is None:
            raise ConfigError(f"base_model: gate_mode cheap_embed needs {name!r}, which {base.path} lacks")
        embed = base.reader(info.file).view(name)
        vocab = cfg.get("vocab_size", embed.shape[0])

        def run(tokenized):
            return _cheap_embedding(embed, tokenized, num_layers, vocab)

        model = None
    elif mode in HIDDEN_MODES:
        model = _load_model(str(base.path), device, progress, trust_remote_code)
        average = mode == "hidden_avg"

        def run(tokenized):
            return _hidden_states(model, tokenized, average)

    else:
        raise ConfigError(f"gate_mode: unknown gate mode {mode!r}")

    try:
        vecs = []
        sets = sum(1 + bool(e.negative_prompts) for e in experts)
        with _progress(sets, progress) as bar:
            for e in experts:
                hs = run(tokenize_prompts(e.positive_prompts, tokenizer))
                bar.update(1)
                if e.negative_prompts:
                    hs -= run(tokenize_prompts(e.negative_prompts, tokenizer))
                    bar.update(1)
                hs /= hs.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
                vecs.append(hs)
        gates = torch.stack(vecs, dim=0).permute(1, 0, 2).cpu()  # (layers, experts, hidden)
    finally:
        if mode == "cheap_embed":
            base.reader(info.file).release(name)
        if model is not None:
            del model
            run = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if gates.shape[0] != num_layers:
        raise ConfigError(f"base_model: the model gave {gates.shape[0]} hidden states, expected {num_layers}")
    return gates


def _load_model(
    path: str, device: torch.device | str, progress: bool | None, trust_remote_code: bool = False
):
    """The base model as mergekit loads it (bf16, on ``device``); transformers' loading bar only when ours
    is shown."""
    import transformers
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if not (progress if progress is not None else sys.stderr.isatty()):
        hf_logging.disable_progress_bar()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=str(device), trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            f"base_model: transformers cannot load {path} for the hidden-state gates ({exc})"
        ) from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def warn_degenerate_gates(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """mergekit's warn_degenerate_gates: layers whose gate matrix has condition number > threshold."""
    bad = [i for i in range(gates.shape[0]) if torch.linalg.cond(gates[i].float()) > threshold]
    if bad:
        if len(bad) == 1:
            where, verb = f"layer {bad[0]}", "has"
        elif len(bad) >= gates.shape[0]:
            where, verb = "ALL layers", "have"
        elif len(bad) == 2:
            where, verb = f"layers {bad[0]} and {bad[1]}", "have"
        else:
            where, verb = "layers " + ", ".join(map(str, bad[:-1])) + f", and {bad[-1]}", "have"
        LOG.warning("%s %s degenerate routing parameters - your prompts may be too similar.", where, verb)
        LOG.warning("One or more experts will be underutilized in your model.")
    return bad
