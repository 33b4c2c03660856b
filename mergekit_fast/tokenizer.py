"""The output tokenizer and vocabulary, as mergekit 0.1.5 builds them (tokenizer/build.py, embed.py).

``build_vocab(...)`` loads the tokenizers with transformers (imported only when a config asks for a
vocabulary: ``tokenizer_source``, a ``tokenizer:`` block) and returns a ``VocabPlan``: the output
tokenizer (saved with ``save_pretrained`` after the merge, as mergekit saves it), its vocabulary, and per
model the permutation from output token ids to the model's own rows. ``VocabPlan.row_maps`` then plans,
for one vocabulary tensor, each input's ``RowMap`` (mergekit_fast.vocabulary): mergekit's
PermutedVocabulary, decided per token before any tensor is read.

mergekit's rules, reproduced:
- the base tokenizer (base_model, else the first model) drops the tokens at or beyond its config's
  vocabulary size (BPE only);
- ``union``: the base vocabulary, then every other model's tokens the base lacks (as added tokens),
  then every model's added tokens (special tokens keep their settings); ``base``: the base tokenizer;
  a model path: that model's tokenizer; ``tokenizer.tokens`` adds the tokens it names;
- a token's row: the model's own row; a token some model lacks gets, for that model: the row of the only
  model that has it, else the base model's, else the mean of the models that have it, else zeros;
  ``tokens:`` entries choose the source (a model, one of its tokens or ids, zeros) and ``force`` applies
  the choice even to models that have the token;
- ``pad_to_multiple_of``: the vocabulary size is rounded up, extra rows are the mean of the others.

Deliberate difference: mergekit adds a union's new tokens in the iteration order of the tokenizers'
vocabulary (a hash map whose order changes from run to run, so the new tokens' ids do too); here they
are added model by model in the order of their ids, so a config always gives the same ids.
"""

from __future__ import annotations

import json
import logging
import tempfile
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_fast import architectures
from mergekit_fast.config import ConfigError, TokenizerSpec, TokenSpec
from mergekit_fast.vocabulary import Copy, Mean, RowMap

LOG = logging.getLogger("mergekit_fast")


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the test extra installs it
        raise ConfigError(
            "tokenizer: merging vocabularies needs transformers (pip install 'mergekit_fast[hf]')"
        ) from None
    return transformers


def _load_tokenizer(path: str, *, trust_remote_code: bool, fast: bool | None = None):
    tf = _transformers()
    kw = {} if fast is None else {"use_fast": fast}
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    try:
        return tf.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    finally:
        tf.logging.set_verbosity(verbosity)


def model_vocab_size(path: str, config: Mapping, *, trust_remote_code: bool) -> int | None:
    """mergekit's get_vocab_size: the config's vocabulary size under its definition's key (else
    ``vocab_size``), read through transformers' config; None when it cannot be read."""
    archs = config.get("architectures") or []
    key = "vocab_size"
    if len(archs) == 1:
        d = architectures.lookup(archs[0], config.get("model_type"))
        if d is not None and d.vocab_size_config_key:
            key = d.vocab_size_config_key
    value = architectures.config_value(config, key, None)
    if isinstance(value, int):
        return value
    try:
        cfg = _transformers().AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        for part in key.split("."):
            cfg = getattr(cfg, part)
        return int(cfg)
    except Exception:  # noqa: BLE001 - mergekit: "Unable to get vocab size", then the tokenizer's size
        return None


def _stripped_base(path: str, config: Mapping, *, trust_remote_code: bool):
    """mergekit's get_stripped_tokenizer: the tokenizer without the tokens at or beyond vocab_size."""
    tok = _load_tokenizer(path, trust_remote_code=trust_remote_code, fast=True)
    size = model_vocab_size(path, config, trust_remote_code=trust_remote_code) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    if not tok.is_fast:
        raise ConfigError(f"tokenizer: {path} has tokens beyond its vocab_size and no fast tokenizer")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ConfigError(
            f"tokenizer: {path} has tokens beyond its vocab_size ({size}) in a {data['model']['type']} "
            "tokenizer; mergekit can strip them only from BPE tokenizers"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) and m.count(" ") == 1 else m
        if not isinstance(parts, list):
            raise ConfigError(f"tokenizer: {path}: unexpected merge {m!r}")
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    import tokenizers

    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_key: str, toks: dict[str, Any], sizes: dict[str, int | None], *, trust_remote_code: bool):
    """mergekit's build_union_tokenizer (new tokens in id order, see the module docstring)."""
    tf = _transformers()
    new_tokens: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key, tok in toks.items():
        size = sizes[key] or tok.vocab_size
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= size:
                LOG.warning("token %r of %s is at or beyond its vocab_size (%d)", t, key, size)
                continue
            new_tokens.setdefault(t, None)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= size:
                continue
            if info.content in added:
                if added[info.content] != info:
                    LOG.warning("token %r is added with different settings by several models; using the first",
                                info.content)  # fmt: skip
                continue
            added[info.content] = info
    base = toks[base_key]
    with tempfile.TemporaryDirectory() as tmp:  # a copy of the base tokenizer, as mergekit makes one
        base.save_pretrained(tmp, legacy_format=False)
        verbosity = tf.logging.get_verbosity()
        tf.logging.set_verbosity_error()
        try:
            out = tf.AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=trust_remote_code)
        finally:
            tf.logging.set_verbosity(verbosity)
    base_vocab = base.get_vocab()
    for t in new_tokens:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class VocabPlan:
    """The output vocabulary and, per model, where each output token's row is."""

    tokenizer: Any  # the output tokenizer (transformers), saved after the merge
    vocab: dict[str, int]  # output token -> id
    size: int  # rows of every vocabulary tensor (the vocabulary, padded)
    perms: dict[str, array]  # model -> per output id: the model's row, or -1
    original: dict[str, dict[str, int]]  # model -> its own vocabulary (for tokens: {token: ...} sources)
    tokens: Mapping[str, TokenSpec] = field(default_factory=dict)
    source: str = "union"
    warned: set = field(default_factory=set)

    @property
    def n(self) -> int:
        return len(self.vocab)

    def row_maps(
        self, name: str, refs: Sequence, models: Sequence[str], axis: int, rows_of, base: str | None
    ):
        """Each present input's RowMap for the vocabulary tensor ``name`` (mergekit's PermutedVocabulary).

        refs: per model its InputRef (None where absent); rows_of(ref): its rows along ``axis``; base: the
        slice's base model. Returns the RowMaps aligned with ``refs`` (None where absent)."""
        present = [i for i, r in enumerate(refs) if r is not None]
        ms = [models[i] for i in present]
        perm = {m: self.perms[m] for m in ms}
        rows = {m: rows_of(refs[i]) for i, m in zip(present, ms)}
        ref_of = {m: refs[i] for i, m in zip(present, ms)}
        by_id = sorted(self.vocab.items(), key=lambda kv: kv[1])

        # Which source each token's default row has (assign_embedding_sources).
        chosen: dict[str, TokenSpec] = dict(self.tokens)
        average: set[str] = set()
        for tok, tid in by_id:
            if tok in chosen:
                continue
            has = [perm[m][tid] >= 0 for m in ms]
            if sum(has) == 1:
                chosen[tok] = TokenSpec("model", ms[has.index(True)])
            elif not any(has):
                chosen[tok] = TokenSpec("zero")
                if (tok, "none") not in self.warned:
                    self.warned.add((tok, "none"))
                    LOG.warning("token %r is in no model: its embedding rows are zeros", tok)
            elif base in ms and perm[base][tid] >= 0:
                chosen[tok] = TokenSpec("model", base)
            else:
                average.add(tok)

        # The default rows (of the tokens some model lacks, or forced): kind per token.
        defaults: dict[int, tuple] = {}
        for tok, tid in by_id:
            spec = chosen.get(tok)
            forced = spec is not None and spec.force
            if not forced and all(perm[m][tid] >= 0 for m in ms):
                continue
            if tok in average:
                defaults[tid] = ("mean", tuple((m, perm[m][tid]) for m in ms if perm[m][tid] >= 0))
            elif spec is not None:
                defaults[tid] = self._default(name, tok, tid, spec, ms, perm, rows)
        maps: list[RowMap | None] = [None] * len(refs)
        for i, m in zip(present, ms):
            own = array("q", [-1]) * self.size
            copies: dict[tuple, tuple[array, array]] = {}
            means: dict[tuple, tuple[array, list[array]]] = {}
            for tok, tid in by_id:
                spec = chosen.get(tok)
                forced = spec is not None and spec.force
                if perm[m][tid] >= 0 and not forced:
                    own[tid] = perm[m][tid]
                elif tid in defaults:
                    kind, *rest = defaults[tid]
                    if kind == "copy":
                        src_model, src_row = rest
                        if src_model == m:
                            own[tid] = src_row
                        else:
                            out_rows, src_rows = copies.setdefault((src_model,), (array("q"), array("q")))
                            out_rows.append(tid)
                            src_rows.append(src_row)
                    elif kind == "mean":
                        (contrib,) = rest
                        key = tuple(c for c, _ in contrib)
                        out_rows, src_rows = means.setdefault(key, (array("q"), [array("q") for _ in key]))
                        out_rows.append(tid)
                        for k, (_, r) in enumerate(contrib):
                            src_rows[k].append(r)
                    # "zero": the row stays zero
                elif (tok, m) not in self.warned:
                    self.warned.add((tok, m))
                    LOG.error("no embedding for token %r in model %s (%s): its row is zeros", tok, m, name)
            pad = self.n if self.size > self.n else None
            used = {k[0] for k in copies} | {c for k in means for c in k}
            maps[i] = RowMap(
                axis=axis,
                size=self.size,
                rows=own,
                copies=tuple(Copy(o, ref_of[k[0]], s) for k, (o, s) in copies.items()),
                means=tuple(
                    Mean(o, tuple((ref_of[c], s) for c, s in zip(k, ss))) for k, (o, ss) in means.items()
                ),
                pad_from=pad,
                sources=tuple(ref_of[c] for c in ms if c in used),
            )
        return maps

    def _default(self, name, tok, tid, spec: TokenSpec, ms, perm, rows) -> tuple:
        """compute_default_embedding: ("copy", model, row) or ("zero",)."""
        if spec.kind == "zero":
            return ("zero",)
        if spec.kind == "none":
            raise ConfigError(
                f"{spec.where}.source: token {tok!r} needs a source (a model, model_token or zero)"
            )
        model = spec.model
        if model not in ms:
            raise ConfigError(
                f"{spec.where}: token {tok!r} takes its row from model {model}, but that model has no "
                f"{name} (or is not one of its inputs)"
            )
        if spec.kind == "model_token":
            row = spec.token_id
            if row is None:
                vocab = self.original.get(model, {})
                if spec.token not in vocab:
                    raise ConfigError(
                        f"{spec.where}.source.token: token {spec.token!r} is not in model {model}"
                    )
                row = vocab[spec.token]
            if not 0 <= row < rows[model]:
                raise ConfigError(
                    f"{spec.where}.source: token id {row} is out of range for model {model} ({name} has "
                    f"{rows[model]} rows)"
                )
            return ("copy", model, row)
        if perm[model][tid] < 0:
            raise ConfigError(f"{spec.where}: token {tok!r} is not in model {model}, which is its source")
        return ("copy", model, perm[model][tid])

    def save(self, out_dir: Path, chat_template: str | None) -> None:
        if chat_template:
            self.tokenizer.chat_template = chat_template
        self.tokenizer.save_pretrained(str(out_dir))


def build_vocab(
    spec: TokenizerSpec,
    *,
    base: str,
    models: Sequence[str],
    configs: Mapping[str, Mapping],
    trust_remote_code: bool = False,
) -> VocabPlan:
    """mergekit's build_tokenizer for ``spec``: ``base`` is the config's base_model (else the first model),
    ``models`` every referenced model, ``configs`` their config.json dicts."""
    what = spec.where
    try:
        base_tok = _stripped_base(base, configs[base], trust_remote_code=trust_remote_code)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' many ways to fail  # noqa: BLE001 - transformers' many ways to fail
        raise ConfigError(
            f"{what}: cannot load the tokenizer of {base} ({type(exc).__name__}: {exc})"
        ) from None
    toks = {base: base_tok}
    for m in models:
        if m == base:
            continue
        try:
            toks[m] = _load_tokenizer(m, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - mergekit assumes the base's tokenizer then
            LOG.warning("cannot load the tokenizer of %s (%s); assuming it is %s's", m, exc, base)
    sizes = {m: model_vocab_size(m, configs[m], trust_remote_code=trust_remote_code) for m in models}
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        out = _union(base, toks, sizes, trust_remote_code=trust_remote_code)
    else:
        try:
            out = _load_tokenizer(spec.source, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"{what}: cannot load the tokenizer of {spec.source} ({type(exc).__name__}: {exc})"
            ) from None
    existing = set(out.get_vocab())
    for t in spec.tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = dict(out.get_vocab())
    n = len(vocab)
    bad = [t for t, i in vocab.items() if not 0 <= i < n]
    if bad:
        raise ConfigError(
            f"{what}: the output tokenizer gives {bad[0]!r} the id {vocab[bad[0]]}, outside [0, {n})"
        )
    size = n
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size = (size // pad + 1) * pad
    perms: dict[str, array] = {}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    for m in models:
        mv = (toks.get(m) or toks[base]).get_vocab()
        limit = sizes[m] if sizes[m] is not None else len(mv)
        p = array("q", [-1]) * n
        for tok, new in by_id:
            old = mv.get(tok)
            if old is None:
                continue
            if old >= limit:
                # mergekit leaves no entry here and then fails on the token; it is treated as absent
                LOG.warning("%s: token %r has id %d, beyond its vocab_size %d (padding?)", m, tok, old, limit)
                continue
            p[new] = old
        perms[m] = p
    return VocabPlan(
        tokenizer=out,
        vocab=vocab,
        size=size,
        perms=perms,
        original={m: dict(t.get_vocab()) for m, t in toks.items()},
        tokens=spec.tokens,
        source=spec.source,
    )


def resolve_chat_template(value: str | None, models: Sequence[str], *, trust_remote_code: bool) -> str | None:
    """mergekit's _set_chat_template: "auto" (the template most of the models' tokenizers have; ties: the
    first model's), one of mergekit's named templates, or a literal Jinja template."""
    if not value:
        return None
    if value == "auto":
        found = []
        for m in models:
            try:
                t = _load_tokenizer(m, trust_remote_code=trust_remote_code).chat_template
            except Exception as exc:  # noqa: BLE001
                LOG.warning("cannot load the tokenizer of %s (%s)", m, exc)
                continue
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        if not found:
            return None
        from collections import Counter

        return Counter(found).most_common(1)[0][0]
    named = architectures.chat_templates()
    if len(value) < 256 and "\n" not in value and "{" not in value and value in named:
        return named[value]
    return value


@dataclass
class TokenizerOutput:
    """What the merge writes as its tokenizer, when not a plain copy of the donor's files: the merged
    tokenizer (always written, as mergekit does), or the donor's tokenizer with a chat template (written
    unless --no-copy-tokenizer)."""

    vocab: VocabPlan | None
    chat_template: str | None
    donor: str
    trust_remote_code: bool = False

    def write(self, out_dir: Path, copy_tokenizer: bool) -> None:
        if self.vocab is not None:
            self.vocab.save(out_dir, self.chat_template)
            return
        if not copy_tokenizer:
            if self.chat_template:
                LOG.warning("chat_template is set but no tokenizer is written (--no-copy-tokenizer)")
            return
        tok = _load_tokenizer(self.donor, trust_remote_code=self.trust_remote_code)
        if self.chat_template:
            tok.chat_template = self.chat_template
        tok.save_pretrained(str(out_dir))
