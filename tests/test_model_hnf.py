"""The MultiFusion HNF model: every switch combination trains (finite outputs, a gradient
for every parameter), layers 1..4, no label leakage, a tiny batch overfits, ODE options,
clear errors, and the text buffers travel in the state_dict."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from multifusion.model import build_model
from multifusion.model.patch_embed import derive_patch_sizes
from multifusion.model.card import placeholder_text, text_record
from multifusion.text.features import TextFeatures, random_text_features

# 32 px, 2 layers at patch sizes 16 and 8 (2 x 2 and 4 x 4 patches), width 16, a
# pyramid stem 8 channels wide: fast (the default graph stem has tests/test_graph_stem.py).
SMALL = {
    "data.image_size": 32,
    "hnf.stem": "pyramid",
    "hnf.stem_width": 8,
    "hnf.layers": 2,
    "hnf.patch_sizes": [16, 8],
    "hnf.dim": 16,
    "hnf.heads": 2,
    "fusion.heads": 2,
    "hnf.dropout": 0.0,
}


def names(num_classes: int = 3) -> list[str]:
    """Class names in label order, as data/prepared/classes.json lists them."""
    return [f"c{k}" for k in range(num_classes)]


def random_text(num_classes: int = 3, per_class: int = 2, length: int = 7, dim: int = 12, seed: int = 0) -> TextFeatures:
    """Random description features of classes ``names(num_classes)``."""
    return random_text_features(names(num_classes), [f"t{i}" for i in range(per_class)], length, dim, seed)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def assert_trains(model: torch.nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Finite logits of the right shape, and a non-zero gradient for every trainable parameter.

    The stem's residual branches start as the identity (last BatchNorm scale 0, so their
    first convs get no gradient on step one): they are switched on here, as one step would."""
    from multifusion.model.baselines.resnet import BasicBlock

    for module in model.modules():
        if isinstance(module, BasicBlock):
            torch.nn.init.ones_(module.bn2.weight)
    logits = model(x)
    assert logits.shape == (x.shape[0], num_classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(x.shape[0]) % num_classes).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("layers,expected", [(1, [8]), (2, [16, 8]), (3, [32, 16, 8]), (4, [32, 16, 8, 4])])
def test_patch_sizes_derived_coarse_to_fine(make_config, layers, expected):
    cfg = make_config({"hnf.layers": layers})
    assert cfg.hnf.patch_sizes is None and cfg.data.image_size == 64
    assert derive_patch_sizes(cfg.data.image_size, layers, None) == expected


def test_non_dividing_patch_size_is_a_clear_error(make_config):
    # params.yaml is checked against the patch grid when it is loaded (ConfigError, a ValueError)
    conv = {"hnf.stem": "conv"}
    with pytest.raises(ValueError, match=r"hnf.patch_sizes: patch size 12 does not divide data.image_size 64"):
        build_model(make_config(conv | {"hnf.patch_sizes": [12, 8, 4]}), names(3), random_text())
    with pytest.raises(ValueError, match=r"data.image_size 60 .* hnf.layers=3"):
        build_model(make_config(conv | {"data.image_size": 60}), names(3), random_text())
    with pytest.raises(ValueError, match="hnf.patch_sizes has 2 entries but hnf.layers is 3"):
        build_model(make_config(conv | {"hnf.patch_sizes": [16, 8]}), names(3), random_text())


COMBOS = list(itertools.product(["ode", "transformer", "none"], [True, False], ["off", "mha", "concat"]))


@pytest.mark.parametrize("encoder,graph,text_mode", COMBOS)
def test_every_switch_combination_trains(make_config, encoder, graph, text_mode):
    torch.manual_seed(0)
    overrides = dict(SMALL, **{"hnf.sequence_encoder": encoder, "hnf.graph": graph})
    overrides["fusion.text"] = text_mode != "off"
    if text_mode != "off":
        overrides["fusion.mode"] = text_mode
    cfg = make_config(overrides)
    model = build_model(cfg, names(3), random_text() if cfg.fusion.text else None)
    assert (model.text is None) == (text_mode == "off")
    assert_trains(model, images(4, 32), 3)


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_layers_one_to_four_with_default_params(make_config, layers):
    torch.manual_seed(0)
    cfg = make_config({"hnf.layers": layers, "hnf.dropout": 0.0})
    model = build_model(cfg, names(10), random_text(num_classes=10))
    assert len(model.layers) == layers
    tokens = layers + int(cfg.hnf.global_token)  # h_fus of every layer, then the global token
    assert model.forward_features(images(2, 64)).shape == (2, tokens, cfg.hnf.dim)
    assert_trains(model, images(2, 64), 10)


def test_default_model_is_no_larger_than_its_trunk_baseline(make_config):
    """The comparison is fair in capacity: the default model (ViG-Ti's blocks, 6 deep instead of
    12) has fewer trainable parameters than the ViG-Ti baseline; at ViG-Ti's depth it has its
    trunk and at most 10% more (the HNF layers and the head), and the pyramid stem likewise
    against ResNet-18, whose trunk it has."""
    from multifusion.model.baselines import build_baseline

    def sizes(overrides, peer):
        cfg = make_config(overrides)
        model = build_model(cfg, names(10), random_text(num_classes=10, dim=384))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in build_baseline(peer, 10, cfg.data.image_size).parameters())

    trainable, vig = sizes({}, "vig")
    assert trainable < vig, (trainable, vig)
    for overrides, peer in (({"hnf.stem_depth": 12}, "vig"), ({"hnf.stem": "pyramid", "hnf.stem_width": 64}, "resnet18")):
        trainable, baseline = sizes(overrides, peer)
        assert baseline < trainable < 1.1 * baseline, (overrides, trainable, baseline)


def test_one_euler_step_freezes_only_the_idle_time_embedding(make_config):
    """One Euler step evaluates the forward field at t = 0 only, where its time term vanishes:
    that one parameter is frozen; with two steps (or rk4) it trains like every other."""
    for ode, frozen in (({"hnf.ode.solver": "euler", "hnf.ode.steps": 1}, True),
                        ({"hnf.ode.solver": "euler", "hnf.ode.steps": 2}, False), ({"hnf.ode.solver": "rk4"}, False)):
        torch.manual_seed(0)
        model = build_model(make_config(dict(SMALL, **ode)), names(3), random_text())
        idle = {name for name, p in model.named_parameters() if not p.requires_grad}
        assert idle == ({f"layers.{i}.sequence.forward_field.time" for i in range(len(model.layers))} if frozen else set()), ode
        assert_trains(model, images(4, 32), 3)


def test_ode_options_dopri5_and_adjoint_run(make_config):
    # the adjoint with rk4 or dopri5: with one Euler step it would evaluate the fields at one end of
    # the interval only, where a time embedding gets no gradient
    for ode in ({"hnf.ode.solver": "dopri5"}, {"hnf.ode.solver": "rk4", "hnf.ode.adjoint": True}, {"hnf.ode.solver": "dopri5", "hnf.ode.adjoint": True}):
        torch.manual_seed(0)
        cfg = make_config(dict(SMALL, **ode, **{"hnf.layers": 1, "hnf.patch_sizes": [8]}))
        assert_trains(build_model(cfg, names(3), random_text()), images(2, 32), 3)


def test_adjoint_gradients_match_direct_backprop(make_config):
    """At rk4 the adjoint's gradients equal backprop's through the solver (at euler they differ by
    the discretisation: the adjoint integrates its own ODE)."""
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        cfg = make_config(dict(SMALL, **{"hnf.layers": 1, "hnf.patch_sizes": [8], "hnf.ode.adjoint": adjoint, "hnf.ode.solver": "rk4", "hnf.ode.steps": 4}))
        model = build_model(cfg, names(3), random_text())
        model(images(2, 32)).square().sum().backward()
        grads.append(model.layers[0].sequence.forward_field.mlp.fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_bad_solver_and_missing_text_are_clear_errors(make_config):
    with pytest.raises(ValueError, match="hnf.ode.solver is 'rk45'; allowed: one of rk4, euler, dopri5"):
        build_model(make_config(dict(SMALL, **{"hnf.ode.solver": "rk45"})), names(3), random_text())
    with pytest.raises(ValueError, match="fusion.text is true but no text features"):
        build_model(make_config(SMALL), names(3), None)
    model = build_model(make_config(SMALL), names(3), random_text())
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 64, 64))


@pytest.mark.parametrize("mode", ["mha", "concat"])
def test_no_label_leakage(make_config, mode):
    """The model never sees labels; at test time an image's output does not depend on the
    rest of its batch (in train mode the stem's BatchNorm uses batch statistics, as the
    ResNet baselines do, so only permutation equivariance holds), and every image sees
    identical text."""
    torch.manual_seed(0)
    model = build_model(make_config(dict(SMALL, **{"fusion.mode": mode})), names(3), random_text())
    assert list(inspect.signature(model.forward).parameters) == ["x"]
    x = images(6, 32, seed=1)
    perm = torch.tensor([5, 3, 0, 1, 4, 2])
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            batch = model(x)
            permuted = model(x[perm])
            if not train:
                alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
                torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch[perm], permuted, atol=1e-5, rtol=1e-4)

    seen = []
    model.head.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    model.eval()
    with torch.no_grad():
        model(x[:2])
        model(x[2:])
    assert seen[0].shape == (6, 16)  # (T, C): one set of text for the whole batch
    torch.testing.assert_close(seen[0], seen[1])  # the same text for every batch
    # every image reads every description of every class: each image's logits (and, with mha,
    # its visual-to-text cross-attention) have a non-zero gradient with respect to each
    # description's token states (showing an image a subset of the text, e.g. one class's or
    # one picked by its batch position, fails here)
    states = model.text.token_states.requires_grad_(True)  # (T, L, D)
    attended = []
    if mode == "mha":
        model.head.visual_to_text.register_forward_hook(lambda m, args, out: attended.append(out))
    for b in range(6):
        logits = model(x[b : b + 1])  # (1, K)
        for what, y in [("logits", logits)] + [("visual-to-text attention", out) for out in attended[-1:]]:
            (grad,) = torch.autograd.grad(y.square().sum(), states, retain_graph=True)
            assert (grad.abs().sum(dim=(1, 2)) > 0).all(), f"image {b}'s {what} ignores a description"


def test_tiny_batch_overfits(make_config):
    torch.manual_seed(0)
    cfg = make_config(dict(SMALL, **{"hnf.dim": 32}))
    model = build_model(cfg, names(4), random_text(num_classes=4))
    x = images(8, 32, seed=2)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(150):
        logits = model(x)
        if (logits.argmax(-1) == y).all() and step > 0:
            break
        opt.zero_grad()
        F.cross_entropy(logits, y).backward()
        opt.step()
    assert (model(x).argmax(-1) == y).all(), f"no 100% train accuracy after {step} steps"


def test_text_buffers_travel_in_the_state_dict(make_config, tmp_path):
    torch.manual_seed(0)
    cfg = make_config(SMALL)
    text = random_text()
    model = build_model(cfg, names(3), text).eval()
    state = model.state_dict()
    assert torch.equal(state["text.token_states"], text.token_states)
    assert torch.equal(state["text.attention_mask"], text.attention_mask)
    trainable = {name for name, _ in model.named_parameters()}
    assert "text.token_states" not in trainable and "text.attention_mask" not in trainable

    save_file(state, str(tmp_path / "model.safetensors"))
    rebuilt = build_model(cfg, names(3), placeholder_text(text_record(text))).eval()
    rebuilt.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x = images(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_each_layer_is_seeded_by_the_one_below(make_config):
    """h_fus(l) seeds layer l+1's CLS token and virtual node: handing layer l+1 zeros instead
    must change its output (and so the logits), for the sequence and the graph branch alike."""
    torch.manual_seed(0)
    for branch in ({"hnf.graph": False}, {"hnf.sequence_encoder": "none"}):
        model = build_model(make_config(dict(SMALL, **branch)), names(3), random_text()).eval()
        x = images(4, 32, seed=3)
        with torch.no_grad():
            seeded = model(x)
            upper = model.layers[1]
            original = upper.forward
            upper.forward = lambda tokens, seed: original(tokens, torch.zeros_like(seed))
            unseeded = model(x)
        assert not torch.allclose(seeded, unseeded, atol=1e-4), f"layer 2 ignores its seed ({branch})"


def test_descriptions_are_matched_to_labels_by_class_name(make_config):
    """Each description's label is its class name's index in classes.json order, whatever order
    the descriptions come in: shuffled descriptions give the same labels and the same logits."""
    from multifusion.model import description_classes

    text = random_text()  # descriptions of c0, c0, c1, c1, c2, c2
    classes = ["c2", "c0", "c1"]  # label order differs from the descriptions' order of appearance
    assert description_classes(text, classes).tolist() == [1, 1, 2, 2, 0, 0]
    perm = [3, 5, 0, 4, 1, 2]
    shuffled = TextFeatures(text.token_states[perm], text.attention_mask[perm], [text.class_names[i] for i in perm],
                            [text.templates[i] for i in perm], [text.samples[i] for i in perm])
    assert description_classes(shuffled, classes).tolist() == description_classes(text, classes)[perm].tolist()
    cfg, x = make_config(SMALL), images(3, 32)
    logits = []
    for features in (text, shuffled):
        torch.manual_seed(0)  # the same weights: only the order of the description buffers differs
        with torch.no_grad():
            logits.append(build_model(cfg, classes, features).eval()(x))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_descriptions_of_other_classes_are_a_one_line_error(make_config):
    from multifusion.model import description_classes

    with pytest.raises(ValueError, match=r"no description of 'c3'; descriptions of classes the data does not have: 'c2'\); "
                                         r"re-run `dvc repro describe embed_text`"):
        description_classes(random_text(), ["c0", "c1", "c3"])
    with pytest.raises(ValueError, match=r"no description of 'c3'\)"):
        build_model(make_config(SMALL), names(4), random_text())


def test_logit_terms_are_the_logits_and_the_bias_share_is_measured(make_config):
    """The cross-modal head's named terms (visual, descriptions, prototypes) sum to exactly
    its logits; bench/text_usage.py's image share is 0 for a per-class constant and 1 for
    logits whose class means are equal (numpy reference)."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    torch.manual_seed(0)
    model = build_model(make_config(SMALL), names(3), random_text()).eval()
    x = images(5, 32, seed=1)
    with torch.no_grad():
        feats, text = model.forward_features(x), model.text_embeddings()
        terms = model.head.logit_terms(feats, text)
        assert set(terms) == {"visual", "descriptions", "prototypes"}
        assert torch.equal(terms["visual"] + terms["descriptions"] + terms["prototypes"], model(x))
    spec = importlib.util.spec_from_file_location("text_usage", Path(__file__).parents[1] / "bench/text_usage.py")
    text_usage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text_usage)
    bias = np.tile(np.array([[1.0, -2.0, 0.5]]), (6, 1))  # (N, K): the same for every image
    centred = np.random.default_rng(0).normal(size=(6, 3))
    centred -= centred.mean(0)
    assert text_usage.image_share(bias) == 0.0
    assert abs(text_usage.image_share(centred) - 1.0) < 1e-12
    rows = text_usage.usage_table({"a": bias, "b": centred}, np.array([0, 1, 2, 0, 1, 2]))
    assert [r[0] for r in rows] == ["a", "b", "all"]
    assert rows[0][3] == 2 / 6  # the bias alone always says class 2
    from sklearn.metrics import f1_score

    assert rows[0][4] == pytest.approx(f1_score([0, 1, 2, 0, 1, 2], [2] * 6, average="macro"))  # 1/6
    assert rows[1][5] == rows[0][3] and rows[1][6] == rows[0][4]  # the whole logits without b are a alone


def test_the_visual_term_reads_the_image_alone(make_config):
    """The text adds terms beside the visual classifier and never rewrites its input: other
    descriptions leave the visual term unchanged and change the two text terms."""
    torch.manual_seed(0)
    model = build_model(make_config(SMALL), names(3), random_text()).eval()
    with torch.no_grad():
        feats, text = model.forward_features(images(4, 32, seed=2)), model.text_embeddings()  # (B, L, C), (T, C)
        terms = model.head.logit_terms(feats, text)
        other = model.head.logit_terms(feats, torch.randn_like(text))
    assert torch.equal(terms["visual"], other["visual"])
    assert not torch.allclose(terms["descriptions"], other["descriptions"])
    assert not torch.allclose(terms["prototypes"], other["prototypes"])


def test_only_the_visual_term_trains_the_trunk(make_config):
    """The two text terms train the text side and the head, never the trunk: their gradient
    reaches no parameter of the patch embedding, the HNF layers or the global token."""
    torch.manual_seed(0)
    model = build_model(make_config(SMALL), names(3), random_text()).eval()
    trunk = [p for m in (model.embed, model.layers, model.global_proj) for p in m.parameters()]
    text_side = [*model.text.parameters(), *model.head.text_to_visual.parameters(), *model.head.image_proj.parameters()]
    terms = model.head.logit_terms(model.forward_features(images(4, 32, seed=3)), model.text_embeddings())
    (terms["descriptions"] + terms["prototypes"]).pow(2).sum().backward(retain_graph=True)
    assert all(p.grad is None for p in trunk)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in text_side)
    terms["visual"].pow(2).sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in trunk if p.grad is not None) > 0
