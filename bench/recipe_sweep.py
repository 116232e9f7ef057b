"""Recipe and architecture sweep (the figures of README "What moved the accuracy").

    python bench/recipe_sweep.py specs.json results.jsonl 8 --prepared data/prepared \
        --text data/text_features --params params.yaml

specs.json: a list of runs, each {"name", "model": "mf" | a baseline name, "overrides":
{dotted params}, optional "epochs", "lr", "balance" (loss | none), "ls", "ema" (decay, 0 =
off), "norm" (fixed | image: per-image standardisation), "init" ("default": PyTorch's
Linear init for MultiFusion's non-stem layers), "seed", "bs"}. Every run trains on the
prepared train split with the product's model, augmentation, AdamW and warmup-cosine
schedule, and reports test top-1 / macro-F1 of the last and the best-val weights, single
view and 8-view. Runs go to N worker processes (on one GPU, or CPU cores), results are
appended to results.jsonl as they finish. fp32 (TF32 matmuls on CUDA).
"""
import copy, json, math, os, sys, time, traceback
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
import torch.multiprocessing as mp

from multifusion.evaluation.evaluate import dihedral_views

ARGS = {}


def per_image(x):
    m = x.mean(dim=(1, 2, 3), keepdim=True); s = x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
    return (x - m) / s


@torch.no_grad()
def logits_of(model, imgs_u8, norm, tta, dev):
    model.eval()
    out = []
    for i in range(0, len(imgs_u8), 256):
        x = torch.from_numpy(np.asarray(imgs_u8[i:i + 256])).float().div(255).unsqueeze(1).to(dev)
        views = dihedral_views(x) if tta else [x]
        acc = 0
        for v in views:
            v = per_image(v) if norm == "image" else (v - 0.5) / 0.25
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=False):
                acc = acc + torch.softmax(model(v).float(), -1)
        out.append((acc / len(views)).cpu())
    return torch.cat(out).numpy()


def scores(probs, labels):
    from sklearn.metrics import f1_score
    pred = probs.argmax(1)
    return float((pred == labels).mean()), float(f1_score(labels, pred, average="macro"))


def run(spec, dev):
    from multifusion.core.config import load_config, config_from_dict, apply_overrides
    from multifusion.model import build_model
    from multifusion.model.baselines import build_baseline
    from multifusion.text.features import TextFeatures
    from multifusion.data.dataset import load_prepared, augment_batch
    from multifusion.core.optim import adamw, warmup_cosine
    from multifusion.training.train import class_weights
    cfg = load_config(spec["_params"])
    ov = dict(spec.get("overrides", {}))
    cfg = config_from_dict(apply_overrides(cfg.to_dict(), ov))
    prep = load_prepared(spec["_prepared"])
    text = TextFeatures.load(spec["_text"]) if cfg.fusion.text else None
    torch.manual_seed(spec.get("seed", 42)); np.random.seed(spec.get("seed", 42))
    K = len(prep.classes)
    model = build_baseline(spec["model"], K, cfg.data.image_size) if spec["model"] != "mf" else build_model(cfg, prep.classes, text)
    if spec.get("init") == "default":
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("embed.stem"):
                m.reset_parameters()  # the gates (ZeroInitLinear) reset to zero
    model.to(dev)
    tr, va, te = (prep.split_indices(s) for s in ("train", "val", "test"))
    X = torch.from_numpy(np.asarray(prep.images[tr])).float().div(255).unsqueeze(1).to(dev)
    Y = torch.from_numpy(prep.labels(tr)).to(dev)
    epochs, bs = spec.get("epochs", 15), spec.get("bs", 32)
    steps_per = len(tr) // bs
    t = cfg.train
    opt = adamw(model, t)
    for g in opt.param_groups: g["lr"] = spec.get("lr", t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(spec.get("warmup", 1) * steps_per, epochs * steps_per))
    w = torch.tensor(class_weights(prep.labels(tr), K), dtype=torch.float32, device=dev) if spec.get("balance", "loss") == "loss" else None
    crit = nn.CrossEntropyLoss(weight=w, label_smoothing=spec.get("ls", 0.1))
    ema_decay = spec.get("ema", 0.0)
    ema = copy.deepcopy(model) if ema_decay > 0 else None
    gen = torch.Generator(device=dev).manual_seed(1)
    norm = spec.get("norm", "fixed")
    best = (-1, None); hist = []
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=torch.Generator().manual_seed(ep)).to(dev)
        correct = 0
        for s in range(min(steps_per, spec.get('max_steps', 10**9))):
            idx = perm[s * bs:(s + 1) * bs]
            x = augment_batch(X[idx], cfg.train.augment, gen)
            x = per_image(x) if norm == "image" else (x - 0.5) / 0.25
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=False):
                lo = model(x)
            loss = crit(lo.float(), Y[idx])
            opt.zero_grad(set_to_none=True); loss.backward()
            if t.grad_clip > 0: nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step(); sched.step()
            correct += (lo.argmax(1) == Y[idx]).sum().item()
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.state_dict().values(), model.state_dict().values()):
                        if pe.dtype.is_floating_point: pe.mul_(ema_decay).add_(pm, alpha=1 - ema_decay)
                        else: pe.copy_(pm)
        evm = ema if ema is not None else model
        vacc, vf1 = scores(logits_of(evm, prep.images[va], norm, False, dev), prep.labels(va))
        hist.append((round(correct / (steps_per * bs), 3), round(vacc, 3), round(vf1, 3)))
        if vf1 > best[0]:
            best = (vf1, copy.deepcopy(evm.state_dict()))
    secs = time.time() - t0
    evm = ema if ema is not None else model
    res = {"name": spec["name"], "spec": spec, "secs": round(secs, 1), "hist": hist,
           "params": sum(p.numel() for p in model.parameters())}
    yte = prep.labels(te)
    for tta in (False, True):
        res[f"last_tta{int(tta)}"] = scores(logits_of(evm, prep.images[te], norm, tta, dev), yte)
    evm.load_state_dict(best[1])
    for tta in (False, True):
        res[f"best_tta{int(tta)}"] = scores(logits_of(evm, prep.images[te], norm, tta, dev), yte)
    return res


def worker(q, rq, gpu):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(2); torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    while True:
        spec = q.get()
        if spec is None: return
        try:
            rq.put(run(spec, dev))
        except Exception:
            rq.put({"name": spec["name"], "error": traceback.format_exc()[-2000:]})


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs")
    parser.add_argument("out")
    parser.add_argument("workers", type=int, nargs="?", default=6)
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--text", default="data/text_features")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    specs = [dict(s, _prepared=args.prepared, _text=args.text, _params=args.params) for s in json.load(open(args.specs))]
    out, nproc = args.out, args.workers
    ctx = mp.get_context("spawn")
    q, rq = ctx.Queue(), ctx.Queue()
    for s in specs: q.put(s)
    ps = [ctx.Process(target=worker, args=(q, rq, 0)) for _ in range(nproc)]
    for _ in ps: q.put(None)
    for p in ps: p.start()
    results = []
    with open(out, "w") as f:
        for _ in specs:
            r = rq.get(); results.append(r)
            f.write(json.dumps(r) + "\n"); f.flush()
            if "error" in r: print(r["name"], "ERROR", r["error"][-600:], flush=True)
            else: print(f'{r["name"]:28s} {r["secs"]:7.1f}s last {r["last_tta0"][0]:.3f}/{r["last_tta0"][1]:.3f} tta {r["last_tta1"][0]:.3f}/{r["last_tta1"][1]:.3f} | best {r["best_tta0"][0]:.3f}/{r["best_tta0"][1]:.3f} tta {r["best_tta1"][0]:.3f}/{r["best_tta1"][1]:.3f} trainacc {r["hist"][-1][0]}', flush=True)
    for p in ps: p.join()
