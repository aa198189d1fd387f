"""The CoMTIP model layer: config, towers, losses, PAAT, zero-shot read-out, add_genes, save/load safety."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import comtip as ct
from comtip.model import _io
from comtip.model._config import LOSS_WEIGHTS
from comtip.model._gene import sentence_dropout
from comtip.model._losses import prompt_logits, readout_value_loss, two_hot_targets
from comtip.model._paat import adversarial_loss, pair_swap

G, T, K, L, B = 12, 8, 4, 8, 6
GENES = [f"GENE{i}" for i in range(G)]


def _levels(n: int = G, k: int = K, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pos = (torch.rand(n, k - 1, generator=gen) * 3 + 0.1).sort(dim=1).values
    return torch.cat([torch.zeros(n, 1), pos], dim=1)


def _text(n: int = G, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, T, generator=gen), dim=1)


def _batch(b: int = B, seed: int = 0, size: int = 64) -> dict[str, torch.Tensor]:
    """A batch following the data layer's contract: top-L sentences of log-normalised expression with zeros."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(b, G, generator=gen) * 6, generator=gen)
    counts[0, 3:] = 0  # a spot with fewer than L expressed genes
    expr = torch.log1p(counts / counts.sum(1, keepdim=True).clamp_min(1) * 1e4)
    vals, idx = expr.sort(dim=1, descending=True)
    idx, vals = idx[:, :L], vals[:, :L]
    mask = vals > 0
    idx = torch.where(mask, idx, 0)
    vals = torch.where(mask, vals, 0.0)
    return {
        "image": torch.rand(b, 3, size, size, generator=gen),
        "gene_idx": idx.long(),
        "gene_val": vals.float(),
        "gene_mask": mask,
        "expr": expr.float(),
        "depth": torch.log1p(counts.sum(1)).float(),
    }


def _model(**overrides) -> ct.CoMTIP:
    torch.manual_seed(0)
    return ct.CoMTIP(ct.CoMTIPConfig.tiny(**overrides), GENES, _text(), _levels())


@pytest.fixture
def model() -> ct.CoMTIP:
    return _model()


# ------------------------------------------------------------------------------------------- config
def test_config_json_roundtrip_and_refusals():
    for cfg in [ct.CoMTIPConfig.tiny(), ct.CoMTIPConfig.cpu(), ct.CoMTIPConfig.paper(), ct.CoMTIPConfig()]:
        assert ct.CoMTIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ct.CoMTIPConfig.cpu().image_encoder == "tf_efficientnet_lite0"
    assert ct.CoMTIPConfig.cpu().image_pretrained == "efficientnet_lite0_package"
    assert ct.CoMTIPConfig.paper().image_encoder == "vit_base_patch32_224"
    assert ct.CoMTIPConfig.tiny().embed_dim == 16
    with pytest.raises(ValueError, match="bogus_field"):
        ct.CoMTIPConfig.from_dict({**ct.CoMTIPConfig.tiny().to_dict(), "bogus_field": 1})
    with pytest.raises(ValueError, match="mfm_loss"):
        ct.CoMTIPConfig.tiny(mfm_loss="l2")
    with pytest.raises(ValueError, match="prompt_weight"):
        ct.CoMTIPConfig.tiny(prompt_weight=-1)
    with pytest.raises(ValueError, match="efficientnet_lite0_package"):
        ct.CoMTIPConfig(image_encoder="resnet18")
    with pytest.raises(ValueError, match="at least one"):
        ct.CoMTIPConfig.tiny(**dict.fromkeys(LOSS_WEIGHTS.values(), 0.0))


def test_constructor_refusals():
    cfg = ct.CoMTIPConfig.tiny()
    with pytest.raises(ValueError, match="duplicated"):
        ct.CoMTIP(cfg, ["A", "A", *GENES[2:]], _text(), _levels())
    with pytest.raises(ValueError, match="n_value_levels"):
        ct.CoMTIP(cfg, GENES, _text(), _levels(k=K + 1))
    bad = _levels()
    bad[3] = bad[3].flip(0)
    with pytest.raises(ValueError, match="non-decreasing"):
        ct.CoMTIP(cfg, GENES, _text(), bad)
    with pytest.raises(ValueError, match="gene_text_embeddings"):
        ct.CoMTIP(cfg, GENES, None, _levels())
    with pytest.raises(ValueError, match="text_dim"):
        ct.CoMTIP(cfg.replace(text_dim=T + 1), GENES, _text(), _levels())
    with pytest.raises(ValueError, match="blocks"):
        ct.CoMTIP(cfg.replace(image_trainable_blocks=99), GENES, _text(), _levels())
    with pytest.raises(ValueError, match="image_size=56"):
        ct.CoMTIP(cfg.replace(image_encoder="test_vit", image_size=56), GENES, _text(), _levels())


# ------------------------------------------------------------------------------------------- shapes
def test_shapes_and_normalisation(model):
    batch = _batch()
    model.eval()
    with torch.no_grad():
        img = model.encode_image(batch["image"])
        img_p = model.encode_image_prompt(batch["image"])
        gene = model.encode_genes(batch["gene_idx"], batch["gene_val"], batch["gene_mask"])
        gene_p = model.encode_genes_prompt(batch["gene_idx"], batch["gene_val"], batch["gene_mask"])
        feats = model.image_features(batch["image"])
        depth = model.predict_depth(batch["image"])
        pred = model.predict_from_images(batch["image"], dihedral=True)
    for emb in (img, img_p, gene, gene_p):
        assert emb.shape == (B, 16)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(B))
    assert not torch.allclose(img, img_p)  # separate heads by default
    assert feats.shape == (B, model.image.num_features)
    assert depth.shape == (B,)
    assert model.prompt_embeddings().shape == (G, K, 16)
    assert pred.shape == (B, G)
    # resized on the fly; uint8 accepted
    assert model.encode_image((batch["image"][:2, :, :40, :40] * 255).to(torch.uint8)).shape == (2, 16)


@pytest.mark.parametrize(
    "encoder", ["test_efficientnet", "test_vit", "test_resnet", "test_convnext", "eva02_tiny_patch14_224"]
)
def test_pooled_features_match_timm(encoder):
    """The split tower computes exactly timm's pre-logits features (Eva: a timm model without a known split)."""
    generic = encoder.startswith("eva")
    size = 56 if generic else 64  # patch 14 / 16
    m = _model(image_encoder=encoder, image_trainable_blocks=-1 if generic else 1, image_size=size).eval()
    assert m.image.family == ("generic" if generic else "vit" if "vit" in encoder else "cnn")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        b = m.image.backbone
        ref = b.forward_head(b.forward_features(m.image.normalize(x)), pre_logits=True)
        tokens, pooled = m.image.forward_suffix(m.image.forward_prefix(x))
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-4)
    assert tokens.shape == (2, m.image.num_tokens, m.image.num_features)


@pytest.mark.parametrize(("encoder", "blocks"), [("test_efficientnet", 1), ("test_vit", 2), ("test_resnet", 0)])
def test_cpu_chunks_give_the_same_features(encoder, blocks, monkeypatch):
    """Inference on the CPU runs in chunks of model.cpu_chunk_size: same tokens and pooled features as one pass."""
    m = _model(image_encoder=encoder, image_trainable_blocks=blocks).eval()
    x = torch.rand(7, 3, 64, 64)
    with torch.no_grad():
        m.cpu_chunk_size = None
        whole = m.image(x)
        calls = []
        u = (m.image.prefix_units or m.image.suffix_units)[0]  # the first unit sees each chunk once
        monkeypatch.setattr(u, "fn", lambda b, t, f=u.fn: calls.append(len(t)) or f(b, t))
        m.cpu_chunk_size = 3
        chunked = m.image(x)
    assert calls == [3, 3, 1]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    m.train()  # training: batch statistics need the whole batch
    calls.clear()
    m.image(x)
    assert calls == ([3, 3, 1] if m.image.prefix_units else [7])  # the frozen prefix still runs in chunks


def test_tools_apply_the_cpu_chunk_size_setting(monkeypatch):
    """The model layer never reads settings: the tools pass settings.cpu_chunk_size to the model they run."""
    from comtip.tl._utils import get_model

    m = _model()
    assert m.cpu_chunk_size == 4
    monkeypatch.setattr(ct.settings, "_cpu_chunk_size", 2)
    assert get_model(m).image.cpu_chunk_size == 2


def test_cpu_chunk_size_setting_is_validated():
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ValueError, match="cpu_chunk_size"):
            ct.settings.cpu_chunk_size = bad
    assert ct.settings.cpu_chunk_size == 4
    assert "cpu_chunk_size: 4" in repr(ct.settings)


@pytest.mark.parametrize(
    ("encoder", "blocks"), [("test_efficientnet", -1), ("test_vit", -1), ("test_vit", 2), ("test_resnet", 0)]
)
def test_masked_branch(encoder, blocks):
    m = _model(image_encoder=encoder, image_trainable_blocks=blocks).train()
    n = m.image.num_tokens
    hidden, visible_idx, hidden_idx = ct.model.random_token_mask(3, n, 0.5)
    assert (hidden.sum(1) == hidden_idx.shape[1]).all()
    assert set(visible_idx[0].tolist()).isdisjoint(hidden_idx[0].tolist())
    feats = m.image.forward_prefix(torch.rand(3, 3, 64, 64))
    bn = [mod for mod in m.image.backbone.modules() if isinstance(mod, torch.nn.BatchNorm2d) and mod.training]
    before = [mod.running_mean.clone() for mod in bn]
    with m.image.frozen_bn_statistics():
        visible, _ = m.image.forward_suffix(feats, token_mask=hidden)
    assert visible.shape == (3, visible_idx.shape[1], m.image.num_features)
    for mod, old in zip(bn, before, strict=True):  # masked inputs do not shift running statistics
        torch.testing.assert_close(mod.running_mean, old)
    full, _ = m.image.forward_suffix(feats)
    visible_full = full.gather(1, visible_idx[..., None].expand(-1, -1, full.shape[-1]))
    if blocks == 0:  # nothing trainable: masking at the output keeps the visible tokens as they are
        torch.testing.assert_close(visible, visible_full)
    else:  # hidden content changes what the visible tokens see
        assert not torch.allclose(visible, visible_full)


# ------------------------------------------------------------------------------------------- losses
def test_all_loss_parts_finite_and_every_parameter_used(model):
    model.train()
    torch.manual_seed(1)
    out = model.training_losses(_batch())
    assert set(out) == {"loss", *LOSS_WEIGHTS}
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    weights = model.config.loss_weights()
    torch.testing.assert_close(out["loss"], sum(weights[k] * out[k] for k in LOSS_WEIGHTS))
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP needs no find_unused_parameters


@pytest.mark.parametrize("part", sorted(LOSS_WEIGHTS))
def test_zero_weight_removes_part_and_its_modules(part):
    m = _model(**{LOSS_WEIGHTS[part]: 0.0}).train()
    torch.manual_seed(1)
    out = m.training_losses(_batch())
    assert part not in out
    assert set(out) == {"loss", *(set(LOSS_WEIGHTS) - {part})}
    assert torch.isfinite(out["loss"])
    module = {
        "mfm": "mfm_generator",
        "paat_disc": "pair_discriminator",
        "depth": "depth_head",
        "mvm": "mvm_head",
        "prompt": "gene_prompt_proj",
    }.get(part)
    if module is not None:
        assert not hasattr(m, module)
    out["loss"].backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None] == []


def test_prompt_only_and_contrastive_only_share_one_head_pair():
    m = _model(infonce_weight=0.0, paat_swap_weight=0.0, paat_adv_weight=0.0)
    assert not hasattr(m, "image_prompt_proj")
    assert not isinstance(m.logit_scale, torch.nn.Parameter)
    m.eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(m.encode_image(x), m.encode_image_prompt(x))


def test_single_side_configs_need_only_their_inputs():
    zero = dict.fromkeys(LOSS_WEIGHTS.values(), 0.0)
    batch = _batch()
    image_only = _model(**{**zero, "mfm_weight": 1.0, "depth_weight": 1.0}).train()
    out = image_only.training_losses({"image": batch["image"], "depth": batch["depth"]})
    assert set(out) == {"loss", "mfm", "depth"}
    gene_only = _model(**{**zero, "mvm_weight": 1.0}).train()
    out = gene_only.training_losses({k: batch[k] for k in ("gene_idx", "gene_val", "gene_mask")})
    assert set(out) == {"loss", "mvm"}
    out["loss"].backward()
    assert all(p.grad is None for p in gene_only.image.parameters())


def test_losses_under_no_grad_for_validation(model):
    model.eval()
    with torch.no_grad():
        out = model.training_losses(_batch())
    assert all(torch.isfinite(v) for v in out.values())


def test_cached_prefix_features_give_the_same_losses():
    m = _model(image_trainable_blocks=1).train()
    batch = _batch()
    torch.manual_seed(3)
    a = m.training_losses(batch)
    cached = {k: v for k, v in batch.items() if k != "image"}
    cached["image_prefix"] = m.image.forward_prefix(batch["image"])
    torch.manual_seed(3)
    b = m.training_losses(cached)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_few_steps_reduce_the_loss():
    m = _model(sentence_dropout=0.0)
    batch = _batch()
    opt = torch.optim.AdamW(m.optimizer_param_groups(lr=3e-3, weight_decay=0.0))

    def loss_at_seed() -> float:
        torch.manual_seed(123)  # the same masks, swaps and prompt genes each time
        return m.training_losses(batch)["loss"].item()

    m.train()
    start = loss_at_seed()
    for step in range(25):
        torch.manual_seed(step)
        out = m.training_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    end = loss_at_seed()
    assert end < 0.8 * start, (start, end)


def test_masked_value_losses(model):
    batch = _batch()
    gene_only = {k: batch[k] for k in ("gene_idx", "gene_val", "gene_mask")}
    model.train()
    out = model.masked_value_losses(gene_only)
    assert set(out) == {"loss", "mvm"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.mvm_head[0].weight.grad is not None
    assert model.image.backbone.conv_stem.weight.grad is None  # gene side only
    with pytest.raises(ValueError, match="mvm_weight"):
        _model(mvm_weight=0.0).masked_value_losses(gene_only)


def test_depth_head_ignores_missing_depth(model):
    model.train()
    pooled = torch.randn(4, model.image.num_features)
    loss = model.depth_head.loss(pooled, torch.tensor([7.0, float("nan"), 8.0, 9.0]))
    assert torch.isfinite(loss)
    assert float(model.depth_head.running_mean) == pytest.approx(8.0)
    assert model.depth_head.loss(pooled, torch.full((4,), float("nan"))).item() == 0.0


def test_depth_head_trains_under_bf16_autocast():
    # the second step updates the fp32 running statistics with the batch's: bf16 statistics made lerp_ fail
    model = _model(depth_weight=0.1)
    model.train()
    batch = _batch()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            parts = model.training_losses(batch)
        assert parts["depth"].dtype == torch.float32 and torch.isfinite(parts["loss"])
        parts["loss"].backward()
    head = model.depth_head
    assert head.running_mean.dtype == head.running_var.dtype == torch.float32
    assert float(head.running_mean) == pytest.approx(float(batch["depth"].mean()), rel=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.predict_depth(batch["image"]).dtype == torch.float32


def test_batch_and_input_validation(model):
    batch = _batch()
    with pytest.raises(ValueError, match="expr"):
        model.training_losses({k: v for k, v in batch.items() if k != "expr"})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode_image(batch["image"] * 255)
    bad = batch["gene_idx"].clone()
    bad[0, 0] = G
    with pytest.raises(ValueError, match="outside the panel"):
        model.encode_genes(bad, batch["gene_val"], batch["gene_mask"])
    with pytest.raises(ValueError, match="expr"):
        model.training_losses({**batch, "expr": batch["expr"][:, :5]})


# ------------------------------------------------------------------------------------------- gene side
def test_pair_swap_changes_pairs_and_keeps_the_values():
    torch.manual_seed(0)
    vals = torch.tensor(
        [
            [3.0, 2.0, 1.0, 0.5, 0.0, 0.0],
            [1.0, 1.0, 1.0, 2.0, 0.0, 0.0],  # mostly equal values: the random permutation often moves nothing
            [2.0, 2.0, 2.0, 0.0, 0.0, 0.0],  # one distinct value: nothing to swap
            [4.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # a single token
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.5],
        ]
    )
    mask = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6]
    ).bool()
    mask[4, 2] = False  # a hole in the middle
    for _ in range(200):
        swapped, changed = pair_swap(vals, mask)
        differs = ((swapped != vals) & mask).any(dim=1)
        assert differs.tolist() == [True, True, False, False, True]
        torch.testing.assert_close(swapped[~mask], vals[~mask])  # padding untouched
        for row in range(vals.shape[0]):  # the same values, permuted among the real tokens
            torch.testing.assert_close(swapped[row][mask[row]].sort().values, vals[row][mask[row]].sort().values)
        assert torch.equal(changed, (swapped != vals) & mask)


def test_pair_discriminator_and_swapped_sentences_are_encoded_differently(model):
    batch = _batch()
    model.eval()
    swapped, _ = pair_swap(batch["gene_val"], batch["gene_mask"])
    with torch.no_grad():
        real = model.encode_genes(batch["gene_idx"], batch["gene_val"], batch["gene_mask"])
        fake = model.encode_genes(batch["gene_idx"], swapped, batch["gene_mask"])
    assert ((real - fake).abs().amax(dim=1) > 1e-4).all()


def test_sentence_dropout():
    torch.manual_seed(0)
    mask = torch.zeros(400, L, dtype=torch.bool)
    mask[:, :6] = True
    mask[:50, 1:] = False  # single-token sentences are never cut
    assert torch.equal(sentence_dropout(mask, 0.0), mask)
    out = sentence_dropout(mask, 1.0)
    assert not (out & ~mask).any()
    assert (out.sum(1) >= 1).all()
    assert torch.equal(out[:50], mask[:50])
    lengths = out[50:].sum(1)
    assert (lengths < 6).any() and set(lengths.tolist()) == set(range(1, 7))
    kept = sentence_dropout(mask, 0.3)[50:].sum(1)
    assert 0.15 < float((kept < 6).float().mean()) < 0.35  # about p of the cut sentences change


def test_adversarial_perturbation_has_the_radius():
    torch.manual_seed(0)
    value_emb = torch.randn(3, 4, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    proj = torch.randn(8, 5)
    seen = []

    def encode(delta):
        seen.append(delta.detach().clone())
        return torch.nn.functional.normalize(((value_emb + delta) * mask[..., None]).sum(1) @ proj, dim=-1)

    image = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    scale = torch.tensor(10.0)
    base = ct.model.info_nce(image, encode(torch.zeros_like(value_emb)), scale)
    for kind in ("fgm", "pgd"):
        seen.clear()
        loss = adversarial_loss(
            encode=encode, image_emb=image, value_emb=value_emb, gene_mask=mask, base_loss=base,
            loss_fn=lambda a, b: ct.model.info_nce(a, b, scale), epsilon=0.1, kind=kind, steps=3,
        )  # fmt: skip
        delta = seen[-1]
        radius = 0.1 * value_emb.detach().norm(dim=-1)
        assert (delta[~mask] == 0).all()
        assert (delta.norm(dim=-1)[mask] <= radius[mask] * (1 + 1e-4)).all()
        torch.testing.assert_close(delta.norm(dim=-1)[mask], radius[mask], rtol=1e-3, atol=1e-6)
        assert loss.item() > base.item()  # the worst direction raises the loss


# ------------------------------------------------------------------------------------------- prompts
def test_two_hot_targets():
    levels = torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.0, 0.5, 0.5, 1.0]])
    values = torch.tensor([[0.0, 0.25], [1.5, 0.5], [3.0, 0.75], [9.0, 2.0]])
    t = two_hot_targets(values, levels)
    assert t.shape == (4, 2, 4)
    torch.testing.assert_close(t.sum(-1), torch.ones(4, 2))
    torch.testing.assert_close(t[0, 0], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(t[1, 0], torch.tensor([0, 0.5, 0.5, 0]))
    torch.testing.assert_close(t[2, 0], torch.tensor([0, 0, 0.5, 0.5]))
    torch.testing.assert_close(t[3, 0], torch.tensor([0, 0, 0, 1.0]))  # above the top level
    torch.testing.assert_close(t[0, 1], torch.tensor([0.5, 0.5, 0, 0]))
    torch.testing.assert_close(t[2, 1], torch.tensor([0, 0, 0.5, 0.5]))  # repeated level
    inside = values.clamp(max=levels[:, -1])
    torch.testing.assert_close((t * levels).sum(-1), inside)  # the target's mean is the value


def test_readout_value_loss_is_the_scaled_error_of_the_predicted_value():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    prompts = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    levels = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 1.0, 1.5], [0.0, 2.0, 4.0, 6.0]])
    values = torch.rand(6, 3) * 3
    values[:, 2] = 1.0  # constant in the batch: left out
    scale = torch.tensor([5.0, 10.0, 20.0])
    pred = (prompt_logits(image, prompts, scale).softmax(-1) * levels).sum(-1)
    var = values[:, :2].var(0, unbiased=False)
    expected = ((pred[:, :2] - values[:, :2]) ** 2 / var).mean()
    torch.testing.assert_close(readout_value_loss(image, prompts, levels, values, scale), expected)
    # no gene varies: zero, with a gradient path
    prompts.requires_grad_(True)
    zero = readout_value_loss(image, prompts, levels, torch.ones(6, 3), scale)
    zero.backward()
    assert zero.item() == 0.0 and prompts.grad is not None


@pytest.mark.parametrize("kind", ["mse", "two_hot"])
def test_readout_stage_trains_the_chosen_loss(kind):
    from comtip.model._losses import prompt_loss

    torch.manual_seed(0)
    model = _model(readout_loss=kind)
    model.split_prompt_encoder()
    pooled = torch.randn(8, model.image.num_features)
    expr = torch.rand(8, G) * 2
    torch.manual_seed(1)
    got = model.readout_losses({"pooled": pooled, "expr": expr})
    torch.manual_seed(1)  # the same genes are sampled
    genes = torch.randperm(model.n_genes)[: model.config.n_prompt_genes]
    levels = model.value_levels[genes]
    prompts = model._encode_prompts(genes, levels, model._gene_prompt_head())
    image = torch.nn.functional.normalize(model._image_prompt_head()(pooled), dim=-1)
    fn = readout_value_loss if kind == "mse" else prompt_loss
    assert set(got) == {"loss", "readout" if kind == "mse" else "prompt"}
    torch.testing.assert_close(got["loss"], fn(image, prompts, levels, expr[:, genes], model._read_scale(genes)))


def test_prediction_lies_within_levels_and_matches_a_direct_computation(model):
    model.eval()
    x = torch.rand(5, 3, 64, 64)
    pred = model.predict_from_images(x)
    levels = model.value_levels
    assert (pred >= levels.min(1).values - 1e-6).all() and (pred <= levels.max(1).values + 1e-6).all()
    with torch.no_grad():
        emb = model.encode_image_prompt(x)
        prompts = model.prompt_embeddings()
        scale = (-(model.log_tau_read + model.log_tau_gene)).exp()
        direct = torch.stack(
            [
                torch.stack([(torch.softmax(prompts[g] @ emb[i] * scale[g], 0) * levels[g]).sum() for g in range(G)])
                for i in range(5)
            ]
        )
        chunked = model.predict_from_image_embeddings(emb, prompts, levels, max_elements=7)
    torch.testing.assert_close(pred, direct)
    torch.testing.assert_close(chunked, direct)
    # a subset of genes, with their per-gene temperatures
    ids = model.gene_index(["GENE3", "GENE7"])
    torch.testing.assert_close(model.predict_from_images(x, ids), direct[:, [3, 7]])
    # shifting every level shifts the prediction by the same amount
    with torch.no_grad():
        shifted = model.predict_from_image_embeddings(emb, prompts, levels + 2.0)
    torch.testing.assert_close(shifted, direct + 2.0)


def test_prompt_embedding_cache_follows_the_weights(model):
    model.eval()
    first = model.prompt_embeddings()
    assert model.prompt_embeddings() is first  # cached
    torch.testing.assert_close(model.prompt_embeddings([2, 5]), first[[2, 5]])
    with torch.no_grad():
        model.gene_encoder.cls_token.add_(0.5)  # an in-place update, like an optimizer step
    second = model.prompt_embeddings()
    assert second is not first and not torch.allclose(second, first)
    model.load_state_dict(model.state_dict())
    assert model.prompt_embeddings() is not second
    custom = model.prompt_embeddings([0, 1], levels=torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    assert custom.shape == (2, 2, 16)


def test_dihedral_average_is_rotation_invariant(model):
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    variants = ct.CoMTIP.dihedral_transforms(x)
    assert len(variants) == 8 and torch.equal(variants[0], x)
    assert len({tuple(v[0, 0].flatten()[:64].tolist()) for v in variants}) == 8
    with torch.no_grad():
        a = model.encode_image_prompt(x, dihedral=True)
        b = model.encode_image_prompt(torch.rot90(x, 1, dims=(-2, -1)).flip(-1), dihedral=True)
        plain = model.encode_image_prompt(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, plain)


def test_add_genes_prompts_new_genes_from_text(model, tmp_path):
    model.eval()
    before = model.prompt_embeddings()
    new_text, new_levels = _text(2, seed=7), _levels(2, seed=7)
    model.add_genes(["NEW1", "NEW2"], new_text, new_levels)
    assert model.n_genes == G + 2 and model.genes[-2:] == ["NEW1", "NEW2"]
    after = model.prompt_embeddings()
    assert after.shape == (G + 2, K, 16)
    torch.testing.assert_close(after[:G], before)  # old genes unchanged
    torch.testing.assert_close(model.gene_encoder.gene_offset[-2:], torch.zeros(2, 16))
    torch.testing.assert_close(model.log_tau_gene[-2:].detach(), torch.zeros(2))
    ids = model.gene_index(["NEW1"])
    with torch.no_grad():
        direct = model.encode_genes_prompt(ids.repeat(K)[:, None], new_levels[0][:, None])
    torch.testing.assert_close(after[G], direct)
    assert model.predict_from_images(torch.rand(3, 3, 64, 64), ids).shape == (3, 1)
    # a different description gives different prompts
    other = _model()
    other.add_genes(["NEW1", "NEW2"], _text(2, seed=8), new_levels)
    assert not torch.allclose(other.eval().prompt_embeddings()[G], after[G])
    # saved and loaded with the panel
    model.save(tmp_path / "m")
    loaded = ct.CoMTIP.load(tmp_path / "m")
    assert loaded.genes == model.genes
    torch.testing.assert_close(loaded.prompt_embeddings(), after)
    with pytest.raises(ValueError, match="already in the panel"):
        model.add_genes(["GENE0"], _text(1), _levels(1))
    with pytest.raises(ValueError, match="text_dim"):
        model.add_genes(["X"], torch.randn(1, T + 1), _levels(1))
    learned = ct.CoMTIP(ct.CoMTIPConfig.tiny(gene_embedding="learned"), GENES, None, _levels())
    with pytest.raises(ValueError, match="learned"):
        learned.add_genes(["X"], _text(1), _levels(1))


# ------------------------------------------------------------------------------------------- freezing
def test_freezing_keeps_frozen_weights_and_batchnorm_fixed():
    m = _model(image_trainable_blocks=1)
    tower = m.image
    suffix = {p for u in tower.suffix_units for p in u.prefixes}
    assert suffix == {f"blocks.{tower.n_blocks - 1}", "conv_head", "bn2"}
    frozen = {n: p.detach().clone() for n, p in tower.backbone.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in tower.backbone.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert all(n.startswith(("conv_head", "bn2", f"blocks.{tower.n_blocks - 1}.")) for n in trainable)
    stats = {n: b.detach().clone() for n, b in tower.backbone.named_buffers() if "running" in n}
    m.train()
    assert not tower.backbone.bn1.training and not tower.backbone.blocks[0].training
    assert tower.backbone.bn2.training
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    out = m.training_losses(_batch())
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    params = dict(tower.backbone.named_parameters())
    buffers = dict(tower.backbone.named_buffers())
    for n, old in frozen.items():
        assert torch.equal(params[n], old), n
        assert params[n].grad is None
    assert any(not torch.equal(params[n], old) for n, old in trainable.items())
    for n, old in stats.items():
        if n.startswith(("bn1", "blocks.0")):
            assert torch.equal(buffers[n], old), n
    assert not torch.equal(buffers["bn2.running_mean"], stats["bn2.running_mean"])

    frozen_all = _model(image_trainable_blocks=0, mfm_weight=0.0)
    assert not any(p.requires_grad for p in frozen_all.image.parameters())
    frozen_all.train()
    assert not any(mod.training for mod in frozen_all.image.backbone.modules())


# ------------------------------------------------------------------------------------------- save / load
def _trained(model: ct.CoMTIP) -> ct.CoMTIP:
    model.train()
    opt = torch.optim.AdamW(model.optimizer_param_groups(lr=1e-3))
    for step in range(2):
        torch.manual_seed(step)
        out = model.training_losses(_batch())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.history.append({"step": step, "loss": out["loss"].item(), "lr": 1e-3})
    model.training_summary = {"epochs": 1, "steps": 2, "best_val": float("nan")}
    return model.eval()


VARIANT = {
    "gene_embedding": "learned",
    "value_embedding": "mlp",
    "separate_prompt_head": False,
    "image_encoder": "test_vit",
}


@pytest.mark.parametrize("overrides", [{}, VARIANT], ids=["tiny", "variant"])
def test_save_load_roundtrip(overrides, tmp_path):
    model = _trained(_model(**overrides))
    model.name = "tiny_test"
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["comtip_version"] == ct.__version__
    assert meta["genes"] == GENES and meta["weights_sha256"] == model.weights_checksum()
    assert meta["config"] == model.config.to_dict()
    assert meta["training"]["summary"]["best_val"] is None  # NaN is stored as null
    loaded = ct.CoMTIP.load(tmp_path / "m")
    assert not loaded.training
    assert loaded.config == model.config and loaded.genes == model.genes and loaded.name == "tiny_test"
    assert loaded.history == model.history and loaded.training_summary["steps"] == 2
    assert loaded.weights_checksum() == model.weights_checksum()
    batch = _batch()
    with torch.no_grad():
        for fn in ("encode_image", "encode_image_prompt"):
            torch.testing.assert_close(
                getattr(loaded, fn)(batch["image"]), getattr(model, fn)(batch["image"]), rtol=0, atol=0
            )
        args = (batch["gene_idx"], batch["gene_val"], batch["gene_mask"])
        torch.testing.assert_close(loaded.encode_genes(*args), model.encode_genes(*args), rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.predict_from_images(batch["image"]), model.predict_from_images(batch["image"]), rtol=0, atol=0
    )
    assert "trained: yes (1 epochs, 2 steps)" in repr(loaded)
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)


def test_checksum_is_deterministic_and_sensitive(model):
    a = model.weights_checksum()
    assert a == model.weights_checksum() and len(a) == 64
    with torch.no_grad():
        model.gene_proj.proj.bias[0] += 1e-3
    assert model.weights_checksum() != a


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "model.ckpt"])
def test_load_refuses_pickle_and_never_runs_it(tmp_path, name):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "marker.txt"
    with open(folder / name, "wb") as fh:
        pickle.dump({"state_dict": _Payload(marker)}, fh)
    # the payload is real: unpickling a copy of it writes its marker
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.read_text() == "pwned"
    assert not marker.exists()
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
        ct.CoMTIP.load(folder)
    assert "never loads" in str(err.value)
    # a config.json next to it changes nothing
    (folder / "config.json").write_text(json.dumps({"comtip_version": ct.__version__, "format_version": 1}))
    with pytest.raises(ValueError, match="pickle"):
        ct.CoMTIP.load(folder)
    assert not marker.exists()


@pytest.fixture
def saved(model, tmp_path) -> Path:
    path = tmp_path / "m"
    model.save(path)
    return path


def _rewrite(path: Path, tensors: dict) -> None:
    save_file(tensors, str(path / "model.safetensors"))


def test_load_refuses_missing_extra_and_misshapen_tensors(saved):
    tensors = load_file(str(saved / "model.safetensors"))
    original = dict(tensors)
    name = "gene_proj.proj.weight"
    del tensors[name]
    _rewrite(saved, tensors)
    with pytest.raises(ValueError, match=rf"model\.safetensors.*missing tensors.*{name}"):
        ct.CoMTIP.load(saved)
    _rewrite(saved, {**original, "surprise.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected tensors.*surprise\.weight"):
        ct.CoMTIP.load(saved)
    _rewrite(saved, {**original, name: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"wrong shapes.*gene_proj\.proj\.weight"):
        ct.CoMTIP.load(saved)
    _rewrite(saved, {k: v for k, v in original.items() if k != "value_levels"})
    with pytest.raises(ValueError, match="value_levels"):
        ct.CoMTIP.load(saved)
    _rewrite(saved, original)
    ct.CoMTIP.load(saved)  # the untouched tensors load


def test_load_refuses_corrupted_or_truncated_files(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupted"):
        ct.CoMTIP.load(saved)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a damaged weight byte: the header still parses
    file.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        ct.CoMTIP.load(saved)
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ct.CoMTIP.load(saved)


def test_load_refuses_a_pickle_named_safetensors_and_never_runs_it(saved, tmp_path):
    marker = tmp_path / "marker.txt"
    with open(saved / "model.safetensors", "wb") as fh:
        pickle.dump({"state_dict": _Payload(marker)}, fh)
    with pytest.raises(
        ValueError, match=r"model\.safetensors could not be read as safetensors.*truncated or corrupted"
    ):
        ct.CoMTIP.load(saved)
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        ct.tl.load_model(saved)
    assert not marker.exists()


def test_load_refuses_newer_major_version_and_bad_configs(saved):
    cfg_file = saved / "config.json"
    meta = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**meta, "comtip_version": "99.0.0"}))
    with pytest.raises(ValueError, match=r"config\.json.*comtip 99\.0\.0.*upgrade"):
        ct.CoMTIP.load(saved)
    cfg_file.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version"):
        ct.CoMTIP.load(saved)
    cfg_file.write_text(json.dumps({**meta, "config": {**meta["config"], "new_knob": 1}}))
    with pytest.raises(ValueError, match="new_knob"):
        ct.CoMTIP.load(saved)
    cfg_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ct.CoMTIP.load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        ct.CoMTIP.load(saved)
    with pytest.raises(FileNotFoundError):
        ct.CoMTIP.load(saved.parent / "nowhere")


def test_interrupted_save_leaves_the_old_model(model, saved, monkeypatch):
    old = model.weights_checksum()
    other = _trained(_model())
    assert other.weights_checksum() != old

    def broken_write(obj, path):
        Path(path).write_text('{"comtip_version": "0.1", "conf')  # half-written, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(_io, "_write_json", broken_write)
    with pytest.raises(OSError, match="disk full"):
        other.save(saved, overwrite=True)
    assert ct.CoMTIP.load(saved).weights_checksum() == old
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no temporary folders left
    monkeypatch.undo()
    other.save(saved, overwrite=True)
    assert ct.CoMTIP.load(saved).weights_checksum() == other.weights_checksum()
    (saved / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        other.save(saved, overwrite=True)


def test_backbone_weights_from_a_safetensors_file(tmp_path):
    import timm

    torch.manual_seed(5)
    source = timm.create_model("test_resnet", num_classes=0)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "tower.safetensors"))
    m = _model(image_encoder="test_resnet", image_pretrained=str(tmp_path / "tower.safetensors"))
    for k, v in source.state_dict().items():
        assert torch.equal(m.image.backbone.state_dict()[k], v), k
    torch.save(source.state_dict(), tmp_path / "tower.pth")
    with pytest.raises(ValueError, match="safetensors"):
        _model(image_encoder="test_resnet", image_pretrained=str(tmp_path / "tower.pth"))


# ------------------------------------------------------------------------------------------- repr
def test_repr(model):
    text = repr(model)
    for piece in ["test_efficientnet", "d = 16", "12 genes", "GENE0", "trainable", "trained: no", "K = 4"]:
        assert piece in text, piece
    n_total = sum(p.numel() for p in model.parameters())
    assert f"{n_total:,} total" in text
    model.training_summary = {"epochs": 3, "steps": 30}
    assert "trained: yes (3 epochs, 30 steps)" in repr(model)


# ------------------------------------------------------------------------------------------- real weights
def test_efficientnet_mapping_refuses_another_architecture():
    import timm

    with pytest.raises(ValueError, match="296"):
        ct.model.load_efficientnet_lite0_package_weights(timm.create_model("test_efficientnet"))


@pytest.mark.slow
def test_cpu_preset_uses_imagenet_efficientnet_lite0():
    """The packaged weights, mapped onto timm, classify known photos (offline)."""
    import timm
    from PIL import Image
    from skimage import data

    clf = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    ct.model.load_efficientnet_lite0_package_weights(clf)
    clf.eval()
    data_cfg = timm.data.resolve_data_config({}, model=clf)
    transform = timm.data.create_transform(**data_cfg)
    with torch.no_grad():
        cat = clf(transform(Image.fromarray(data.chelsea()))[None]).softmax(-1)[0]
        cup = clf(transform(Image.fromarray(data.coffee()))[None]).softmax(-1)[0]
    assert int(cat.argmax()) in {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert float(cat[[281, 282, 285]].sum()) > 0.8
    assert int(cup.argmax()) == 967  # espresso

    model = ct.CoMTIP(ct.CoMTIPConfig.cpu(), GENES, torch.randn(G, 384), _levels(k=16))
    assert model.image.num_features == 1280 and model.image.grid == (7, 7)
    torch.testing.assert_close(model.image.pixel_mean.flatten(), torch.tensor(data_cfg["mean"]))
    torch.testing.assert_close(model.image.pixel_std.flatten(), torch.tensor(data_cfg["std"]))
    ref = {k: v for k, v in clf.state_dict().items() if not k.startswith("classifier")}
    got = model.image.backbone.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # the pooled features are the classifier's input
    model.eval()
    x = torch.from_numpy(np.array(Image.fromarray(data.chelsea()).resize((224, 224)))).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = clf.classifier(model.image_features(x.float() / 255))
    assert int(logits.argmax()) in {281, 282, 285}


@pytest.mark.slow
def test_paper_preset_builds_offline_with_random_weights():
    model = ct.CoMTIP(ct.CoMTIPConfig.paper(image_pretrained=None), GENES, _text(), _levels(k=16))
    assert model.image.family == "vit" and model.image.grid == (7, 7) and model.image.pool == "cls"
    model.eval()
    with torch.no_grad():
        assert model.encode_image(torch.rand(1, 3, 224, 224)).shape == (1, 256)


def test_gene_offset_dropout_leaves_offsets_out_in_training_only():
    from comtip.model._gene import GeneTextEncoder

    idx = torch.arange(G)
    torch.manual_seed(0)
    enc = GeneTextEncoder(ct.CoMTIPConfig.tiny(gene_offset_dropout=0.5), G, _text())
    with torch.no_grad():  # offsets start at zero: make them visible
        enc.gene_offset.normal_()
    text_only = enc.text_proj(enc.text_emb)
    enc.eval()
    torch.testing.assert_close(enc.gene_tokens(idx), text_only + enc.gene_offset)  # eval: every offset
    enc.train()
    torch.manual_seed(1)
    tokens = torch.stack([enc.gene_tokens(idx) for _ in range(20)])
    dropped = torch.isclose(tokens, text_only.expand_as(tokens)).all(-1)  # (20, G): offset left out
    kept = torch.isclose(tokens, (text_only + enc.gene_offset).expand_as(tokens)).all(-1)
    assert (dropped ^ kept).all()  # each gene has all of its offset or none
    assert 0.3 < dropped.float().mean() < 0.7
    with pytest.raises(ValueError, match="gene_offset_dropout"):
        ct.CoMTIPConfig.tiny(gene_offset_dropout=1.0)


@pytest.mark.parametrize("gene_embedding", ["text+offset", "learned"])
def test_gene_encoder_gradients_are_reproducible(gene_embedding):
    """Repeated genes in a batch: the per-gene parameters' gradients are the same bits on every backward pass.

    Indexing a parameter (``offset[gene_idx]``) sums the rows of repeated genes in a thread-dependent order on the
    CPU; this made identical training runs drift apart in the last bits (benchmarks/README: run to run).
    """
    torch.manual_seed(0)
    n_genes, dim = 64, 128
    learned = gene_embedding == "learned"
    cfg = ct.CoMTIPConfig.tiny(gene_embedding=gene_embedding, gene_dim=dim, text_dim=None if learned else 8)
    enc = ct.model.GeneTextEncoder(cfg, n_genes, None if learned else torch.randn(n_genes, 8))
    idx = torch.randint(0, n_genes, (32, 64))
    weight = torch.randn(32, 64, dim)
    param = enc.gene_offset if gene_embedding == "text+offset" else enc.gene_emb
    grads = []
    for _ in range(10):
        param.grad = None
        (enc.gene_tokens(idx) * weight).sum().backward()
        grads.append(param.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])
