"""Vocabularies: tokenizer_source union / base / a model, the tokenizer: block, chat_template and
--unsafe-truncate-embeddings, against mergekit-yaml on models whose vocabularies differ.

Model a has 128 tokens (w3..w127 after three specials), b has 136 (w7..w139): they share w7..w127 at
other ids. Outputs are compared with mergekit's token by token (the set of tokens, the base tokens'
ids, every token's embedding and lm_head rows, the padding rows), the rest tensor by tensor, config.json
as a whole, and the tokenizer files byte for byte where mergekit's ids are deterministic (a union's new
tokens get ids in a hash-map order in mergekit, so only their rows are compared there).
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import pytest
import torch
from helpers import HAS_GPU, read_model, run_mergekit, run_ours

from mergekit_fast.config import ConfigError, parse_config
from mergekit_fast.methods import InputRef
from mergekit_fast.plan import build_plan
from mergekit_fast.testing import make_model, write_tokenizer
from mergekit_fast.vocabulary import Copy, Mean, RowMap, gather, gather_reference

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="session")
def tok_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_models")
    a = make_model(root / "a", seed=1, num_layers=2, tokenizer=True)
    b = make_model(root / "b", seed=2, num_layers=2, vocab_size=136)
    write_tokenizer(b, 136, shift=4)
    c = make_model(root / "c", seed=3, num_layers=2, tokenizer=True)
    return {"a": a, "b": b, "c": c}


def linear(a, b, extra: str = "", dtype: str = "float32") -> str:
    return (f"merge_method: linear\nbase_model: {a}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.3}}\ndtype: {dtype}\n{extra}")  # fmt: skip


def vocab(path: Path) -> dict[str, int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path).get_vocab()


def assert_same_vocab_merge(
    ours: Path, theirs: Path, base: Path, *, same_ids: bool, vocab_tensors=VOCAB
) -> None:
    va, vb = vocab(ours), vocab(theirs)
    assert set(va) == set(vb)
    base_vocab = vocab(base)
    assert all(
        va[t] == vb[t] for t in base_vocab if t in vb and vb[t] == base_vocab[t]
    )  # the base keeps its ids
    if same_ids:
        assert va == vb
    a, b = read_model(ours), read_model(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if name in vocab_tensors:
            for tok in va:
                assert torch.equal(x[va[tok]], y[vb[tok]]), (name, tok)
            assert torch.equal(x[len(va) :], y[len(vb) :]), name  # padding rows
        else:
            assert torch.equal(x, y), name
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    if set(vocab_tensors) == set(VOCAB):  # a Llama: transformers loads it at the new vocabulary size
        import transformers

        model, info = transformers.AutoModelForCausalLM.from_pretrained(ours, output_loading_info=True)
        assert not any(info.values()), info
        assert model.get_input_embeddings().weight.shape[0] == a["model.embed_tokens.weight"].shape[0]
    files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"}
    for f in sorted(files):
        assert (ours / f).exists() == (theirs / f).exists(), f
        if same_ids and (ours / f).exists():
            assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f


CASES = {
    "union": ("tokenizer_source: union\n", False),
    "base": ("tokenizer_source: base\n", True),
    "model": ("tokenizer_source: {b}\n", True),
    "tokens": (
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n  tokens:\n"
        "    w10: {{source: {b}, force: true}}\n"
        "    '<new>': {{source: {{kind: zero}}}}\n"
        "    w130: {{source: {{kind: model_token, model: {a}, token: w5}}}}\n"
        "    w131: {{source: {{kind: model_token, model: {b}, token_id: 3}}, force: true}}\n"
        "    '<new2>': {{source: {{kind: model_token, model: {b}, token_id: 5}}}}\n",
        False,
    ),
    "padded_model": ("tokenizer:\n  source: {a}\n  pad_to_multiple_of: 48\n", True),
}


@pytest.mark.mergekit
@pytest.mark.parametrize("case", list(CASES))
def test_vocabulary_merge_matches_mergekit(tok_models, tmp_path, case):
    a, b = tok_models["a"], tok_models["b"]
    extra, same_ids = CASES[case]
    cfg = linear(a, b, extra.format(a=a, b=b))
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_vocab_merge(ours, theirs, a, same_ids=same_ids)
    n = len(vocab(ours))
    rows = read_model(ours)["model.embed_tokens.weight"].shape[0]
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == rows >= n
    if case == "tokens":
        assert rows == 192 and n == 142
        emb = read_model(ours)["model.embed_tokens.weight"]
        assert not emb[vocab(ours)["<new>"]].any()  # a zero row


@pytest.mark.mergekit
def test_union_of_models_the_base_tokenizer_lacks_and_the_new_ids(tok_models, tmp_path):
    a, b = tok_models["a"], tok_models["b"]
    cfg = linear(a, b, "tokenizer_source: union\n")
    ours = run_ours(cfg, tmp_path / "ours")
    v = vocab(ours)
    # the base's 128 tokens keep their ids, b's w128..w139 follow in b's own order (mergekit: hash-map order)
    assert [t for t, _ in sorted(v.items(), key=lambda kv: kv[1])][128:] == [f"w{i}" for i in range(128, 140)]
    emb, ea, eb = (read_model(p)["model.embed_tokens.weight"] for p in (ours, a, b))
    vb = vocab(b)
    # w128 is only in b: both inputs use b's row, so the merge is b's row
    assert torch.equal(emb[v["w128"]], eb[vb["w128"]].float())
    # w3 is only in a, the base: a's row for both
    assert torch.equal(emb[v["w3"]], ea[3].float())


@pytest.mark.mergekit
@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m['content'] }}{% endfor %}"])
def test_chat_template_matches_mergekit(tok_models, tmp_path, template):
    a, c = tok_models["a"], tok_models["c"]
    cfg = linear(a, c, f"chat_template: {json.dumps(template)}\n")
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(ours)
    assert tok.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False)


@pytest.mark.mergekit
def test_chat_template_with_a_vocabulary(tok_models, tmp_path):
    a, b = tok_models["a"], tok_models["b"]
    cfg = linear(a, b, "tokenizer_source: base\nchat_template: alpaca\n")
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert (ours / "chat_template.jinja").read_bytes() == (theirs / "chat_template.jinja").read_bytes()


@pytest.mark.mergekit
def test_unsafe_truncate_embeddings_matches_mergekit(tok_models, tmp_path):
    a, b = tok_models["a"], tok_models["b"]
    cfg = linear(a, b)
    ours = run_ours(cfg, tmp_path / "ours", "--unsafe-truncate-embeddings")
    theirs = run_mergekit(cfg, tmp_path / "theirs", unsafe_truncate_embeddings=True)
    x, y = read_model(ours), read_model(theirs)
    assert sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert x["model.embed_tokens.weight"].shape[0] == 128
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())


def test_different_vocabulary_sizes_without_a_tokenizer_say_what_to_do(tok_models):
    a, b = tok_models["a"], tok_models["b"]
    with pytest.raises(
        ConfigError, match=r"different vocabulary sizes: .*tokenizer_source: union.*--unsafe-truncate"
    ):
        build_plan(parse_config(linear(a, b)))


def test_verify_checks_the_reindexed_inputs(tok_models, tmp_path):
    a, b = tok_models["a"], tok_models["b"]
    out = run_ours(linear(a, b, "tokenizer:\n  source: union\n  pad_to_multiple_of: 32\n", "bfloat16"),
                   tmp_path / "out", "--verify", "all")  # fmt: skip
    assert read_model(out)["lm_head.weight"].shape == (160, 32)


def test_vocabulary_merge_runs_the_rest_natively(tok_models, tmp_path, monkeypatch):
    # a SLERP with a new vocabulary: the embeddings go through the gather (torch), the layers keep the
    # native by-address path
    from mergekit_fast import engine

    seen = []
    real = engine._runs_natively

    def spy(t, plan, writers):
        ok = real(t, plan, writers)
        seen.append((t.name, ok))
        return ok

    monkeypatch.setattr(engine, "_runs_natively", spy)
    a, b = tok_models["a"], tok_models["b"]
    cfg = f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.5}}\ntokenizer_source: union\n"
    run_ours(cfg, tmp_path / "out")
    native = dict(seen)
    if any(native.values()):  # the native module is built here
        assert not native["model.embed_tokens.weight"] and not native["lm_head.weight"]
        assert native["model.layers.0.mlp.up_proj.weight"]


# --------------------------------------------------------------------------------------------------
# The row gather itself


def _random_rowmap(gen, n_src: int, size: int, axis: int, others) -> RowMap:
    rows = torch.randint(-1, n_src, (size,), generator=gen).tolist()
    filled = [r for r, s in enumerate(rows) if s < 0]
    half = len(filled) // 2
    copies = (
        Copy(
            array("q", filled[:half]),
            others[0],
            array("q", torch.randint(0, n_src, (half,), generator=gen).tolist()),
        ),
    )
    rest = filled[half:]
    means = (Mean(array("q", rest), tuple((o, array("q", torch.randint(0, n_src, (len(rest),), generator=gen).tolist()))
                                          for o in others)),)  # fmt: skip
    return RowMap(axis=axis, size=size + 3, rows=array("q", rows + [-1, -1, -1]), copies=copies, means=means,
                  pad_from=size, sources=tuple(others))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("axis", [0, 1])
def test_gather_matches_the_row_by_row_reference(dtype, axis):
    gen = torch.Generator().manual_seed(3)
    n, size, width = 40, 50, 24
    shape = (n, width) if axis == 0 else (width, n)
    tensors = {f"t{i}": torch.randn(shape, generator=gen).to(torch.bfloat16) for i in range(3)}
    refs = [InputRef("m", f"t{i}") for i in range(3)]
    rm = _random_rowmap(gen, n, size, axis, refs[1:])

    def load(r):
        return tensors[r.tensor]

    got = gather(rm, tensors["t0"], load, dtype)
    want = gather_reference(rm, tensors["t0"], load, dtype)
    assert got.shape == want.shape == rm.out_shape(shape) and got.dtype == dtype
    assert torch.equal(got, want)
    out = torch.empty(rm.out_shape(shape), dtype=dtype)
    assert gather(rm, tensors["t0"], load, dtype, out) is out and torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_vocabulary_merge_on_cuda_equals_cpu(tok_models, tmp_path):
    a, b = tok_models["a"], tok_models["b"]
    cfg = linear(a, b, "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n")
    cpu = read_model(run_ours(cfg, tmp_path / "cpu", "--device", "cpu"))
    gpu = read_model(run_ours(cfg, tmp_path / "gpu", "--device", "cuda"))
    assert sorted(cpu) == sorted(gpu)
    for name in VOCAB:
        assert torch.equal(cpu[name], gpu[name]), name  # the gather runs on the host in both


# --------------------------------------------------------------------------------------------------
# Architectures without a definition: the vocabulary tensors come from transformers (meta device)


@pytest.fixture(scope="session")
def layout_tok_models(tmp_path_factory):
    from mergekit_fast.testing import make_layout_model

    root = tmp_path_factory.mktemp("layout_tok")
    out = {}
    for kind in ("mpt", "llava"):
        out[kind] = (make_layout_model(root / f"{kind}_a", kind, seed=1, tokenizer=True),
                     make_layout_model(root / f"{kind}_b", kind, seed=2, **(
                         {"vocab_size": 136} if kind == "mpt" else {"text_config": {**_llava_text(), "vocab_size": 136}})))  # fmt: skip
        write_tokenizer(out[kind][1], 136, shift=4)
    return out


def _llava_text():
    from mergekit_fast.testing import OTHER_LAYOUTS

    return dict(OTHER_LAYOUTS["llava"][2]["text_config"])


@pytest.mark.mergekit
def test_inferred_architecture_vocabulary_matches_mergekit(layout_tok_models, tmp_path):
    a, b = layout_tok_models["mpt"]
    cfg = linear(a, b, "tokenizer_source: union\n")
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert_same_vocab_merge(ours, theirs, a, same_ids=False, vocab_tensors=("transformer.wte.weight",))


def test_llava_with_a_union_vocabulary_loads(layout_tok_models, tmp_path):
    import transformers

    a, b = layout_tok_models["llava"]
    out = run_ours(linear(a, b, "tokenizer_source: union\n"), tmp_path / "out")
    merged = read_model(out)
    assert merged["language_model.model.embed_tokens.weight"].shape[0] == 140
    assert merged["language_model.lm_head.weight"].shape[0] == 140
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == 140
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.mergekit
def test_chat_template_auto_without_templates_matches_mergekit(tok_models, tmp_path):
    # no input tokenizer has a template: mergekit sets none and re-saves the donor's tokenizer
    a, c = tok_models["a"], tok_models["c"]
    cfg = linear(a, c, "chat_template: auto\n")
    ours = run_ours(cfg, tmp_path / "ours")
    theirs = run_mergekit(cfg, tmp_path / "theirs")
    assert sorted(p.name for p in ours.iterdir() if p.name.startswith("tok")) == sorted(
        p.name for p in theirs.iterdir() if p.name.startswith("tok")
    )
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f
