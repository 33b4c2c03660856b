"""peft's merge utilities on mergekit_fast (``mergekit_fast.integrations.peft``), against peft itself.

Oracle: ``peft.utils.merge_utils`` and ``LoraModel.add_weighted_adapter`` of the installed peft. The
deterministic functions must equal peft's bit for bit (``torch.equal``) in every dtype: they run peft's
arithmetic op for op and only find the kept entries differently (a kthvalue cut where no tie straddles it,
torch.topk otherwise), so no tolerance is needed. DARE with the default draws (torch.bernoulli) equals
peft's under the same torch seed; with the Philox draws it equals peft's given the same masks, and its
masks match the keep probability within binomial error.
"""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.utils import merge_utils as pm  # noqa: E402

from mergekit_fast.integrations import peft as ours  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DENSITIES = [0.0, 1e-4, 0.1, 0.5, 0.9]


@pytest.fixture(autouse=True)
def _restore():
    ours.set_draws("torch")
    yield
    ours.uninstall()
    ours.set_draws("torch")
    assert pm.ties.__module__ == "peft.utils.merge_utils"


def tasks(dtype, n=3, shape=(48, 40), seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randn(shape, generator=g)
        if ties:  # a few magnitudes repeated, so that ties straddle the cut
            t = (t * 4).round() / 4
        out.append(t.to(dtype))
    return out


def weights(n=3):
    return torch.tensor([0.7, -0.4, 1.3][:n])  # fp32, as add_weighted_adapter builds them


def same(a, b):
    """Bit-for-bit equal values (NaN where peft has NaN: DARE at density 0 divides 0 by 0, as peft does)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    assert torch.equal(a, b), float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "ties"])
def test_deterministic_functions_equal_peft(dtype, tied):
    ts = tasks(dtype, ties=tied)
    w = weights()
    same(ours.task_arithmetic(ts, w), pm.task_arithmetic(ts, w))
    same(ours.task_arithmetic(ts, w.to(dtype)), pm.task_arithmetic(ts, w.to(dtype)))
    for density in DENSITIES:
        same(ours.magnitude_prune(ts, w, density), pm.magnitude_prune(ts, w, density))
        for method in ("total", "frequency"):
            same(ours.ties(ts, w, density, method), pm.ties(ts, w, density, method))
        same(ours.prune(ts[0], density, "magnitude"), pm.prune(ts[0], density, "magnitude"))
    stacked = torch.stack(ts)
    for method in ("total", "frequency"):
        mask = pm.calculate_majority_sign_mask(stacked, method)
        same(ours.calculate_majority_sign_mask(stacked, method), mask)
        same(ours.disjoint_merge(stacked, mask), pm.disjoint_merge(stacked, mask))
    same(ours.calculate_majority_sign_mask(stacked), pm.calculate_majority_sign_mask(stacked))


def test_the_cut_is_ours_where_no_tie_straddles_it(monkeypatch):
    """fp32 without ties: the kthvalue cut decides (torch.topk is not called), and keeps topk's entries."""
    calls = {"topk": 0}
    real = torch.topk

    def counting(*a, **k):
        calls["topk"] += 1
        return real(*a, **k)

    t = tasks(torch.float32, n=1, shape=(300, 200))[0]
    expected = pm.prune(t, 0.3, "magnitude")
    monkeypatch.setattr(torch, "topk", counting)
    same(ours.prune(t, 0.3, "magnitude"), expected)
    assert calls["topk"] == 0
    tied = torch.ones(300, 200)  # every magnitude ties: torch.topk chooses
    ours.prune(tied, 0.3, "magnitude")
    assert calls["topk"] == 1


def test_special_values_equal_peft():
    t = torch.randn(64, 64)
    t[0, 0], t[1, 1], t[2, 2], t[3, 3] = float("nan"), float("inf"), -float("inf"), -0.0
    ts = [t, torch.randn(64, 64)]
    w = weights(2)
    for density in (0.2, 0.6):
        same(ours.ties(ts, w, density), pm.ties(ts, w, density))
        same(ours.magnitude_prune(ts, w, density), pm.magnitude_prune(ts, w, density))


def test_prune_edges_as_peft():
    t = torch.randn(10)
    for f in (ours.prune, pm.prune):
        with pytest.warns(UserWarning, match="no pruning will be performed"):
            assert f(t, 1.0, "magnitude") is t
        with pytest.raises(ValueError, match="Density should be >= 0"):
            f(t, -0.1, "random")
        with pytest.raises(ValueError, match="Unknown method"):
            f(t, 0.5, "nope")
    with pytest.raises(RuntimeError, match="Unimplemented mask method"):
        ours.calculate_majority_sign_mask(torch.stack([t, t]), "nope")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same(ours.prune(t, 0.0, "magnitude"), pm.prune(t, 0.0, "magnitude"))  # k = 0: nothing kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dare_with_torch_draws_equals_peft_under_the_same_seed(dtype):
    ts, w = tasks(dtype), weights()
    for density in (0.0, 0.3, 0.8):
        for name in ("dare_linear", "dare_ties"):
            torch.manual_seed(11)
            theirs = getattr(pm, name)(ts, w, density)
            torch.manual_seed(11)
            mine = getattr(ours, name)(ts, w, density)
            same(mine, theirs)
        torch.manual_seed(3)
        theirs = pm.prune(ts[0], density, "random", rescale=False)
        torch.manual_seed(3)
        same(ours.prune(ts[0], density, "random", rescale=False), theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dare_with_philox_draws_equals_peft_given_the_masks(dtype, monkeypatch):
    """Our Philox masks recorded, then fed to peft's torch.bernoulli: the same results bit for bit."""
    ours.set_draws("philox")
    ts, w = tasks(dtype), weights()
    masks = []
    real = ours._random_mask
    monkeypatch.setattr(ours, "_random_mask", lambda t, d: masks.append(real(t, d)) or masks[-1])
    for name in ("dare_linear", "dare_ties"):
        masks.clear()
        mine = getattr(ours, name)(ts, w, 0.4)
        assert len(masks) == len(ts)
        fed = iter(list(masks))
        monkeypatch.setattr(torch, "bernoulli", lambda p, *a, _fed=fed, **k: next(_fed))
        theirs = getattr(pm, name)(ts, w, 0.4)
        monkeypatch.undo()
        monkeypatch.setattr(ours, "_random_mask", lambda t, d: masks.append(real(t, d)) or masks[-1])
        same(mine, theirs)


def test_philox_draws_keep_the_density_and_follow_torch_manual_seed():
    ours.set_draws("philox")
    t = torch.randn(256, 256)
    n = t.numel()
    for density in (0.1, 0.5, 0.9):
        torch.manual_seed(5)
        a = ours.prune(t, density, "random", rescale=True)
        kept = a != 0
        sd = (density * (1 - density) / n) ** 0.5
        assert abs(float(kept.double().mean()) - density) < 6 * sd
        same(a[kept], t[kept] / density)  # peft's rescale: 1 / density
        torch.manual_seed(5)
        same(ours.prune(t, density, "random", rescale=True), a)  # reproducible
        assert not torch.equal(
            ours.prune(t, density, "random", rescale=True) != 0, kept
        )  # a new seed each call
        # peft's own draws keep the same fraction, within binomial error of ours
        theirs = pm.prune(t, density, "random", rescale=True) != 0
        assert abs(float(kept.double().mean()) - float(theirs.double().mean())) < 6 * sd * 2**0.5
    with pytest.raises(ValueError, match="draws must be one of"):
        ours.set_draws("numpy")


# ----------------------------------------------------------------------------- LoraModel.add_weighted_adapter


@pytest.fixture(scope="module")
def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    base = LlamaForCausalLM(cfg)
    lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(**lora), adapter_name="t1")
    model.add_adapter("t2", LoraConfig(**lora))
    model.add_adapter("t3", LoraConfig(**{**lora, "lora_alpha": 8}))
    return model


def merged_adapter(model, name):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if f".{name}." in k}


COMBINATIONS = ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties", "ties_svd", "magnitude_prune_svd",
                "dare_ties_svd"]  # fmt: skip


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_add_weighted_adapter_gives_the_same_adapter(lora_model, combination, monkeypatch):
    calls = []
    for name in ("prune", "task_arithmetic", "disjoint_merge"):
        real = getattr(ours, name)
        monkeypatch.setattr(ours, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    kw = dict(adapters=["t1", "t2", "t3"], weights=[0.6, -0.3, 1.1], combination_type=combination)
    if combination != "linear":
        kw["density"] = 0.4
    if "ties" in combination:
        kw["majority_sign_method"] = "frequency" if combination == "ties" else "total"
    torch.manual_seed(21)
    lora_model.add_weighted_adapter(adapter_name=f"{combination}_peft", **kw)
    assert not calls
    installed = ours.install()
    assert "peft.tuners.lora.model.ties" in installed and ours.is_installed()
    torch.manual_seed(21)
    lora_model.add_weighted_adapter(adapter_name=f"{combination}_ours", **kw)
    ours.uninstall()
    assert calls, "our functions were not called"
    theirs = merged_adapter(lora_model, f"{combination}_peft")
    mine = merged_adapter(lora_model, f"{combination}_ours")
    assert len(theirs) == len(mine) > 0
    for k, v in theirs.items():
        # the SVD variants refactor the same delta with torch.linalg.svd: same input, same factors
        same(mine[k.replace("_peft.", "_ours.")], v)
    lora_model.delete_adapter(f"{combination}_peft")
    lora_model.delete_adapter(f"{combination}_ours")


def test_install_and_uninstall_restore_peft():
    from peft.tuners.lora import model as lora_model

    before = {n: getattr(lora_model, n) for n in ours._LORA_NAMES}
    ours.install()
    ours.install()  # again: harmless
    assert all(getattr(lora_model, n) is getattr(ours, n) for n in ours._LORA_NAMES)
    assert pm.prune is ours.prune
    ours.uninstall()
    assert all(getattr(lora_model, n) is f for n, f in before.items())
    assert pm.prune.__module__ == "peft.utils.merge_utils" and not ours.is_installed()
