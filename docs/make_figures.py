"""The documentation's two drawn figures, made from the code rather than by hand.

    .venv/bin/python docs/make_figures.py architecture         # docs/img/architecture.png + the shapes table in docs/model.md
    .venv/bin/python docs/make_figures.py screenshot MODEL_DIR IMAGE...   # docs/img/screening_report.png

``architecture`` builds the default model of ``params.yaml`` (10 classes, 5 descriptions
each, MiniLM's 384-wide token states), runs a batch of 2 through it with forward hooks,
and draws the diagram with the shapes it measured; the same shapes go into
``docs/model.md`` between ``<!-- shapes:begin -->`` and ``<!-- shapes:end -->``.
``screenshot`` runs ``multifusion predict ... --report`` on the images and photographs the
page with headless Chromium (the Debian package, network off), as tests/headless.py does.
(This file is excluded from the site in mkdocs.yml.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
SHAPES_BEGIN, SHAPES_END = "<!-- shapes:begin -->", "<!-- shapes:end -->"
N_CLASSES, N_TEMPLATES, TEXT_LEN, TEXT_DIM, BATCH = 10, 5, 128, 384, 2


def measured_shapes() -> tuple[list[tuple[str, str]], dict]:
    """[(what, shape)] of one forward pass of the default model, and the config's key sizes."""
    import torch

    from multifusion.core.config import load_config
    from multifusion.model import build_model
    from multifusion.text.features import TextFeatures

    cfg = load_config(ROOT / "params.yaml")
    classes = [f"class{i}" for i in range(N_CLASSES)]
    T = N_CLASSES * N_TEMPLATES
    text = TextFeatures(
        token_states=torch.zeros(T, TEXT_LEN, TEXT_DIM), attention_mask=torch.ones(T, TEXT_LEN, dtype=torch.bool),
        class_names=[c for c in classes for _ in range(N_TEMPLATES)], templates=list(cfg.llm.templates) * N_CLASSES,
        samples=[0] * T,
    )
    torch.manual_seed(0)
    model = build_model(cfg, classes, text).eval()
    S = cfg.data.image_size
    seen: dict[str, object] = {}

    def keep(name):
        return lambda _m, inputs, output: seen.__setitem__(name, (inputs, output))

    model.embed.register_forward_hook(keep("embed"))
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(keep(f"layer{i}"))
    model.head.register_forward_hook(keep("head"))
    with torch.no_grad():
        logits = model(torch.zeros(BATCH, 1, S, S))
    def fmt(t) -> str:  # the batch dimension shown as B
        dims = [str(d) for d in t.shape]
        return "(" + ", ".join(["B", *dims[1:]] if t.shape[0] == BATCH else dims) + ")"

    tokens, pooled = seen["embed"][1]
    visual, text_emb = seen["head"][0][:2]
    rows = [("micrograph x", f"(B, 1, {S}, {S})")]
    for i, (t, p) in enumerate(zip(tokens, model.patch_sizes)):
        rows.append((f"layer {i + 1} patch tokens (patch {p} px, a {int(t.shape[1] ** 0.5)} x {int(t.shape[1] ** 0.5)} grid)", fmt(t)))
    if pooled is not None:
        rows.append(("trunk's deepest map, globally pooled", fmt(pooled)))
    for i in range(len(model.layers)):
        rows.append((f"h_fus of layer {i + 1} (MoE of h_CLS and e_VN; seeds layer {i + 2})" if i + 1 < len(model.layers)
                     else f"h_fus of layer {i + 1} (MoE of h_CLS and e_VN)", fmt(seen[f"layer{i}"][1])))
    rows += [
        ("description token states (LM output, stored in the model)", fmt(model.text.token_states)),
        ("description embeddings (attention-pooled, projected)", fmt(text_emb)),
        ("visual tokens handed to the head (every h_fus + global token)", fmt(visual)),
        ("logits", fmt(logits)),
    ]
    sizes = {"S": S, "patches": list(model.patch_sizes), "C": cfg.hnf.dim, "T": T, "k": cfg.graph.k,
             "cheb": cfg.graph.cheb_k, "width": cfg.hnf.stem_width, "depth": cfg.hnf.stem_depth, "heads": cfg.fusion.heads,
             "solver": cfg.hnf.ode.solver, "L": len(model.patch_sizes), "tokens": visual.shape[1]}
    return rows, sizes


def shapes_table(rows: list[tuple[str, str]]) -> str:
    return "\n".join([f"_Measured by `python docs/make_figures.py architecture` on the default `params.yaml`, a batch of "
                      f"B = {BATCH}, {N_CLASSES} classes x {N_TEMPLATES} descriptions._", "",
                      "| tensor | shape |", "|---|---|", *(f"| {what} | `{shape}` |" for what, shape in rows)])


def draw_architecture(rows: list[tuple[str, str]], sizes: dict, out: Path) -> None:
    from multifusion.core.plotting import pyplot

    plt = pyplot()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(12, 7.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 7.2)
    ax.axis("off")
    shape = dict(rows)

    def box(x, y, w, h, text, colour, size=8.5):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03,rounding_size=0.08", fc=colour, ec="#333", lw=0.9))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, wrap=True)

    def arrow(x0, y0, x1, y1, label="", colour="#333"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=11, lw=1.0, color=colour))
        if label:
            ax.text((x0 + x1) / 2 + 0.05, (y0 + y1) / 2, label, fontsize=7, color="#444", ha="left", va="center")

    S, C, L = sizes["S"], sizes["C"], sizes["L"]
    box(0.2, 5.9, 1.9, 0.9, f"micrograph\n(B, 1, {S}, {S})\ngrey, info bar cropped", "#eeeeee")
    box(2.6, 5.9, 2.6, 0.9, f"graph trunk: conv stem +\n{sizes['depth']} Vision GNN blocks\n(kNN Grapher + FFN, width {sizes['width']})", "#dce8f7")
    arrow(2.1, 6.35, 2.6, 6.35)
    # HNF layers, coarse to fine
    token_rows = [r for r in rows if r[0].startswith("layer ")]
    fus_rows = [r for r in rows if r[0].startswith("h_fus")]
    y0 = 4.3
    for i in range(L):
        x = 0.3 + i * 2.75
        grid = re.search(r"a (\d+ x \d+) grid", token_rows[i][0]).group(1)
        ax.text(x + 1.2, y0 + 1.05, f"HNF layer {i + 1}: patch {sizes['patches'][i]} px, {grid} tokens {token_rows[i][1]}",
                fontsize=7, ha="center")
        arrow(3.9, 5.9, x + 1.2, y0 + 1.2, colour="#7a9cc6")
        box(x, y0, 1.15, 0.85, f"patch sequence\n+ CLS\nbidirectional\nNeural ODE ({sizes['solver']})", "#f7e3c6", 7)
        box(x + 1.25, y0, 1.15, 0.85, f"patch graph\nkNN k={sizes['k']}\n+ virtual node\nChebConv K={sizes['cheb']}", "#d8f0d2", 7)
        box(x + 0.3, y0 - 1.05, 1.8, 0.6, f"MoE gate -> h_fus\n{fus_rows[i][1]}", "#fff2a8", 7.5)
        arrow(x + 0.57, y0, x + 0.9, y0 - 0.45)
        arrow(x + 1.83, y0, x + 1.5, y0 - 0.45)
        if i + 1 < L:
            arrow(x + 2.1, y0 - 0.75, x + 2.75, y0 + 0.4, "seeds CLS\n+ virtual node", colour="#b08900")
    # the global token
    box(8.6, 5.9, 2.9, 0.9, f"global token: trunk's deepest map,\npooled + projected to C = {C}", "#dce8f7", 7.5)
    arrow(5.2, 6.55, 8.6, 6.55)
    # visual tokens
    box(3.2, 1.95, 5.6, 0.6, f"visual tokens: every h_fus + global token  {shape['visual tokens handed to the head (every h_fus + global token)']}",
        "#fff2a8", 8)
    for i in range(L):
        arrow(0.3 + i * 2.75 + 1.2, y0 - 1.05, 6.0, 2.55, colour="#b08900")
    arrow(10.05, 5.9, 8.0, 2.55, colour="#7a9cc6")
    # text side
    box(0.2, 0.3, 2.9, 1.2, f"class descriptions (LLM, zero-shot CoT)\n-> small LM (MiniLM, MLM-adapted)\ntoken states {shape['description token states (LM output, stored in the model)']}",
        "#eadcf5", 7.5)
    box(3.5, 0.4, 2.3, 1.0, f"attention pooling\n+ projection\n{shape['description embeddings (attention-pooled, projected)']}", "#eadcf5", 7.5)
    arrow(3.1, 0.9, 3.5, 0.9)
    box(6.3, 0.25, 2.9, 1.3, f"cross-modal head ({sizes['heads']} heads, both ways)\nlogit = visual classifier\n+ description match\n+ prototype similarity\n(text terms read the tokens detached)",
        "#f6d5d5", 7)
    arrow(5.8, 0.9, 6.3, 0.9)
    arrow(6.0, 1.95, 7.2, 1.55)
    box(9.7, 0.5, 1.9, 0.8, f"logits {shape['logits']}\ncalibrated by T", "#eeeeee", 8)
    arrow(9.2, 0.9, 9.7, 0.9)
    ax.set_title("MultiFusion: Hierarchical Network Fusion + LLM descriptions (default params; B = batch)", fontsize=10.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def architecture() -> None:
    rows, sizes = measured_shapes()
    draw_architecture(rows, sizes, IMG / "architecture.png")
    page = ROOT / "docs" / "model.md"
    text = page.read_text()
    head, rest = text.split(SHAPES_BEGIN, 1)
    _, tail = rest.split(SHAPES_END, 1)
    page.write_text(f"{head}{SHAPES_BEGIN}\n{shapes_table(rows)}\n{SHAPES_END}{tail}")
    print(f"{IMG / 'architecture.png'}, {page}: shapes of {len(rows)} tensors")


def screenshot(model_dir: str, images: list[str]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.html"
        subprocess.run([str(Path(sys.executable).parent / "multifusion"), "predict", "--model", model_dir, *images,
                        "--out", str(Path(tmp) / "predictions.csv"), "--report", str(report)], check=True,
                       env=os.environ | {"HF_HUB_OFFLINE": "1"})
        offline = ["unshare", "-n"] if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 else []
        out = IMG / "screening_report.png"
        subprocess.run([*offline, chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--no-first-run", f"--user-data-dir={tmp}/profile", "--proxy-server=127.0.0.1:9",
                        "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,820", f"--screenshot={out}",
                        f"{report.as_uri()}?sort=confidence&order=asc"], check=True, capture_output=True, timeout=120)
    print(out)


if __name__ == "__main__":
    what, *rest = sys.argv[1:] or ["architecture"]
    architecture() if what == "architecture" else screenshot(rest[0], rest[1:])
