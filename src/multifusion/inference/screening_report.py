"""The screening report: one self-contained HTML page of a ``multifusion predict`` run.

    page = ScreeningReport("report.html", "models/hnf", loaded, uncertain_threshold=0.5)
    page.add_batch(batch, good, csv_rows, device)   # per decoded batch, after inference
    page.close()

One table row per input, in input order: the image as the model saw it, the explanation
overlay (:mod:`multifusion.inference.explain`: where the call came from), the file, the top-k classes
with calibrated probabilities (the CSV's values), the uncertain / unknown / abstained flags
with the unknown-material score, what the call used (its logit margin over the runner-up
split into the head's visual, description-match and prototype terms:
:mod:`multifusion.inference.call_terms`; the most attended descriptions only where that
attention is not flat), and for an unreadable file its reason (never flagged unknown). Above the table, the batch summary:
how many images the unknown score flags against the fraction the model's val split
predicts, with a drift warning when a one-sided binomial test puts the batch's count
below ``drift_p`` (:func:`multifusion.evaluation.ood.drift_test`). Images are inlined as
base64 PNG; a small inline script sorts (input order, most or least certain first) and
filters (class, uncertain only, unknown only). No network: no CDN, no external file. The state is in
the URL (``?sort=confidence&order=asc&class=Particles&uncertain=1&unknown=1``) so a view can be
bookmarked. Rows are streamed to a temporary file, so memory does not grow with the
number of images.
"""

from __future__ import annotations

import base64
import html
import shutil
import tempfile
from pathlib import Path

import numpy as np

from multifusion.core.atomic import atomic_write
from multifusion.evaluation.ood import Drift, drift_test
from multifusion.inference.call_terms import FLAT, TERMS, attention_flatness, margin_terms
from multifusion.inference.explain import Explainer, overlay, png_bytes, saved_text_record, top_descriptions
from multifusion.model.card import LoadedModel

ATTENDED = 3  # descriptions listed per image

STYLE = """
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}
.meta{color:#555;margin-bottom:.8em}
.controls{display:flex;gap:1.2em;align-items:center;margin:.6em 0;flex-wrap:wrap}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}
img.px{width:128px;height:128px;image-rendering:pixelated;display:block}
img.ov{width:128px;height:128px;display:block}
.call{font-weight:600}
.bar{height:6px;background:#3b6fb6;margin-top:3px}
.uncertain td{background:#fff6e0}
.flag{color:#b36b00;font-weight:600}
.unknown td{background:#efe6fb}
.unk{color:#6a2fb3;font-weight:600}
.abst{color:#555;font-weight:600}
.score{font-size:12px;color:#444}
.summary{margin:.4em 0}
.drift{background:#fde8e8;border:1px solid #d33;padding:.5em .8em;margin:.5em 0;font-weight:600}
.error td{background:#fde8e8}
.others,.attn{font-size:12px;color:#444;margin:0;padding-left:1.1em}
.used{font-size:12px;color:#222}
.flat{font-size:12px;color:#777}
.path{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all;max-width:26em}
"""

SCRIPT = r"""
(function(){
  var body=document.querySelector('#rows'), rows=Array.prototype.slice.call(body.rows);
  var sortSel=document.getElementById('sort'), clsSel=document.getElementById('cls'), unc=document.getElementById('unc'), unk=document.getElementById('unk');
  function conf(r){return r.dataset.status==='ok'?parseFloat(r.dataset.conf):null;}
  function apply(){
    var mode=sortSel.value, want=clsSel.value, onlyUnc=unc.checked, onlyUnk=unk.checked;
    var order=rows.slice();
    if(mode!=='input'){
      var sign=mode==='asc'?1:-1;
      order.sort(function(a,b){
        var ca=conf(a), cb=conf(b);
        if(ca===null||cb===null){return (ca===null)-(cb===null)||(+a.dataset.i)-(+b.dataset.i);}
        return sign*(ca-cb)||(+a.dataset.i)-(+b.dataset.i);
      });
    }
    var shown=0;
    order.forEach(function(r){
      var ok=(want===''||(want==='(unreadable)'?r.dataset.status==='error':r.dataset.cls===want))&&(!onlyUnc||r.dataset.uncertain==='1')&&(!onlyUnk||r.dataset.unknown==='1');
      r.hidden=!ok; if(ok){shown++;} body.appendChild(r);
    });
    document.getElementById('shown').textContent=shown;
    var q=new URLSearchParams();
    if(mode!=='input'){q.set('sort','confidence');q.set('order',mode);}
    if(want!==''){q.set('class',want);} if(onlyUnc){q.set('uncertain','1');} if(onlyUnk){q.set('unknown','1');}
    try{history.replaceState(null,'',location.pathname+(q.toString()?'?'+q:''));}catch(e){}
    document.body.dataset.order=order.filter(function(r){return !r.hidden;}).map(function(r){return r.dataset.i;}).join(',');
  }
  var q=new URLSearchParams(location.search);
  if(q.get('sort')==='confidence'){sortSel.value=q.get('order')==='asc'?'asc':'desc';}
  if(q.get('class')!==null){clsSel.value=q.get('class');}
  unc.checked=q.get('uncertain')==='1'; unk.checked=q.get('unknown')==='1';
  sortSel.onchange=clsSel.onchange=unc.onchange=unk.onchange=apply;
  document.getElementById('least').onclick=function(){sortSel.value='asc';apply();};
  apply();
  function decoded(){
    var imgs=Array.prototype.slice.call(document.images);
    var good=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
    document.body.dataset.images=imgs.length; document.body.dataset.decoded=good;
  }
  if(document.readyState==='complete'){decoded();}else{window.addEventListener('load',decoded);}
})();
"""


def _img(png: bytes, css: str, alt: str) -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


class ScreeningReport:
    """Collects the rows of one predict run and writes the page on :meth:`close`."""

    def __init__(self, path: str | Path, model_dir: str | Path, loaded: LoadedModel, uncertain_threshold: float, top_k: int,
                 drift_p: float | None = None) -> None:
        self.path = Path(path)
        self.model_dir = Path(model_dir)
        self.explainer = Explainer(loaded.model)
        self.classes = list(loaded.classes)
        self.threshold = uncertain_threshold
        self.top_k = top_k
        self.text = saved_text_record(model_dir)
        self.counts = {"inputs": 0, "ok": 0, "uncertain": 0, "error": 0, "unknown": 0, "abstained": 0, "flat": 0}
        self.unknown = loaded.unknown  # the card's unknown-score entry (None: the model has no fitted score)
        self.drift_p = drift_p
        self.method = ""
        self._rows = tempfile.TemporaryFile(mode="w+", encoding="utf-8")

    def add_batch(self, batch: list[tuple[Path, np.ndarray | None, str | None]], good: list[int], csv_rows: list[dict],
                  probs: np.ndarray, device: str, views: np.ndarray | None = None) -> None:
        """One decoded batch: ``good`` indexes its readable images, ``probs`` (len(good), C) their
        calibrated probabilities, ``csv_rows`` its rows as written to the CSV, ``views``
        (len(good),) how many views each call averaged (None: one)."""
        explained = {}
        if good:
            images = np.stack([batch[i][1] for i in good])  # (B, S, S) uint8
            calls = probs.argmax(axis=1)  # (B,)
            maps = self.explainer.explain(images, calls, device)
            parts = margin_terms(self.explainer.model, images, calls, device, views)  # None without the cross-modal head
            flatness = None if maps.attention is None else attention_flatness(maps.attention)  # (B,)
            self.method = maps.method
            for j, i in enumerate(good):
                attention = None if maps.attention is None else maps.attention[j]
                used = None if parts is None else (self.classes[parts.runner_up[j]], parts.margin[j], parts.terms[j])
                flat = None if flatness is None else float(flatness[j])
                self.counts["flat"] += int(flat is not None and flat >= FLAT)
                explained[i] = (maps.heat[j], top_descriptions(attention, self.text, ATTENDED), used, flat)
        for i, ((path, image, _), row) in enumerate(zip(batch, csv_rows)):
            self._rows.write(self._row_html(self.counts["inputs"], path, image, row, explained.get(i)))
            self.counts["inputs"] += 1
            self.counts["ok" if row["status"] == "ok" else "error"] += 1
            self.counts["uncertain"] += int(row.get("uncertain") is True)
            self.counts["unknown"] += int(row.get("unknown") is True)
            self.counts["abstained"] += int(row.get("abstained") is True)

    def _row_html(self, index: int, path: Path, image: np.ndarray | None, row: dict, explained) -> str:
        name = html.escape(str(path))
        link = f'<a class="path" href="{html.escape(Path(path).resolve().as_uri())}">{name}</a>'
        if row["status"] != "ok":
            return (f'<tr class="error" data-i="{index}" data-status="error" data-cls="" data-conf="" data-uncertain="0" '
                    f'data-unknown="0" data-abstained="0">'
                    f'<td>{index + 1}</td><td></td><td></td><td>{link}</td>'
                    f'<td colspan="5"><b>unreadable:</b> {html.escape(str(row.get("error", "")))}</td></tr>\n')
        ranked = [(row[f"top{r}_class"], row[f"top{r}_prob"]) for r in range(1, self.top_k + 1) if f"top{r}_class" in row]
        (top1, p1), others = ranked[0], ranked[1:]
        heat, attended, used, flat = explained
        uncertain, unknown, abstained = row["uncertain"] is True, row.get("unknown") is True, row.get("abstained") is True
        flags = " ".join(flag for on, flag in ((uncertain, "<span class=flag>uncertain</span>"),
                                                (unknown, "<span class=unk>unknown</span>"),
                                                (abstained, "<span class=abst>abstained</span>")) if on)
        score = row.get("ood_score", "")
        score_cell = "" if score == "" else f'<span class="score">{float(score):.4g}</span>'
        other = "".join(f"<li>{html.escape(str(c))} {p:.3f}</li>" for c, p in others)
        attn = "".join(f"<li>{html.escape(c)} &middot; {html.escape(t)} {w:.2f}</li>" for c, t, w in attended)
        if flat is not None and flat >= FLAT:  # near-uniform weights: a list would name descriptions the call did not use
            attn = ""
        parts = "" if used is None else (
            f'<div class="used">margin {used[1]:.2f} over {html.escape(str(used[0]))}: '
            + ", ".join(f"{name} {value:+.2f}" for name, value in zip(TERMS, used[2])) + "</div>")
        note = "" if flat is None or flat < FLAT else f'<span class="flat">attention flat ({flat:.2f} of max entropy): not listed</span>'
        return (
            f'<tr class="{"unknown" if unknown else "uncertain" if uncertain else "ok"}" data-i="{index}" data-status="ok" '
            f'data-cls="{html.escape(str(top1))}" data-conf="{p1:.6f}" data-uncertain="{int(uncertain)}" '
            f'data-unknown="{int(unknown)}" data-abstained="{int(abstained)}">'
            f'<td>{index + 1}</td><td>{_img(png_bytes(image), "px", "micrograph")}</td>'
            f'<td>{_img(png_bytes(overlay(image, heat)), "ov", "explanation overlay")}</td><td>{link}</td>'
            f'<td><div class="call">{html.escape(str(top1))}</div>{p1:.3f}<div class="bar" style="width:{100 * p1:.0f}px"></div></td>'
            f'<td><ul class="others">{other}</ul></td><td>{flags}</td><td>{score_cell}</td>'
            f'<td>{parts}{f"<ul class=attn>{attn}</ul>" if attn else ""}{note}</td></tr>\n'
        )

    def _head(self) -> str:
        c = self.counts
        options = "".join(f'<option value="{html.escape(n)}">{html.escape(n)}</option>' for n in self.classes)
        where = {"grad-cam": "Grad-CAM on the model's last convolutional feature map",
                 "input-gradient": "gradient x input saliency"}.get(self.method, "")
        attended = ("the call's logit margin over the runner-up class, split into the head's terms (visual: the classifier "
                    "on the image tokens; descriptions: the called class's description match; prototypes: the similarity to "
                    "its mean description), over the views the call averaged; the most attended descriptions are listed only where "
                    f"the image-to-description attention is not flat (entropy below {FLAT:g} of its maximum; "
                    f"{c['flat']} of {c['ok']} images here are flat: near-equal weights on every description, from which a "
                    "list would name descriptions the call did not use)" if self.text else "no text terms in this model")
        return (
            f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Screening report: {c['inputs']} micrographs</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>Screening report</h1>\n"
            f'<div class="meta">model <code>{html.escape(str(self.model_dir))}</code>; {c["inputs"]} inputs: '
            f'{c["ok"]} classified, <span class="flag">{c["uncertain"]} uncertain</span> (top-1 probability below '
            f'{self.threshold:g}), {c["error"]} unreadable. Probabilities are calibrated (temperature scaling). '
            f"Overlay: where the call came from ({where}); what the call used: {attended}.</div>\n"
            + self._summary() +
            '<div class="controls"><label>sort <select id="sort"><option value="input">input order</option>'
            '<option value="desc">most certain first</option><option value="asc">least certain first</option></select></label>'
            '<button id="least" type="button">least certain first</button>'
            f'<label>class <select id="cls"><option value="">all</option>{options}<option value="(unreadable)">(unreadable)</option></select></label>'
            '<label><input type="checkbox" id="unc"> uncertain only</label>'
            '<label><input type="checkbox" id="unk"> unknown only</label><span><span id="shown"></span> shown</span></div>\n'
            "<table><thead><tr><th>#</th><th>image</th><th>where</th><th>file</th><th>call</th>"
            f"<th>next classes</th><th>flag</th><th>unknown score</th><th>what the call used</th></tr></thead><tbody id=\"rows\">\n"
        )

    def drift(self) -> Drift | None:
        """The batch's unknown count tested against the val fraction (None: no score or no test)."""
        if self.unknown is None or self.drift_p is None:
            return None
        return drift_test(self.counts["ok"], self.counts["unknown"], float(self.unknown["val_unknown_fraction"]),
                          int(self.unknown.get("n_val", 0)), self.drift_p)

    def _summary(self) -> str:
        """The batch summary above the table: unknown and abstained counts, and the drift warning."""
        c, u = self.counts, self.unknown
        if u is None:
            return '<div class="summary">No unknown-material score: this model was saved without one (retrain to fit it).</div>\n'
        share = c["unknown"] / c["ok"] if c["ok"] else 0.0
        text = (f'<div class="summary" id="batch-summary"><span class="unk">{c["unknown"]} of {c["ok"]} unknown</span> '
                f'({share:.1%}): unlike the training micrographs by the {html.escape(str(u["score"]))} score '
                f'(above {float(u["threshold"]):.4g}, the threshold that keeps {float(u["keep_rate"]):.0%} of the val split; '
                f'on val it flags {float(u["val_unknown_fraction"]):.1%}). {c["abstained"]} abstained.</div>\n')
        drift = self.drift()
        if drift is not None and drift.alarm:
            text += (f'<div class="drift" id="drift">Drift warning: {drift.unknown} of {drift.n} images are unknown '
                     f'({drift.fraction:.1%}) where val predicts {drift.expected_fraction:.1%}; binomial p = {drift.p_value:.2g} '
                     f'&lt; {self.drift_p:g}. This batch looks unlike the training set: check the instrument, magnification '
                     f'and material before trusting its calls.</div>\n')
        return text

    def close(self) -> Path:
        """Write the page (head, the streamed rows, the script) to ``path``; returns it."""
        try:
            with atomic_write(self.path, "w", encoding="utf-8") as out:  # all of the page or none of it
                out.write(self._head())
                self._rows.seek(0)
                shutil.copyfileobj(self._rows, out)
                out.write(f"</tbody></table>\n<script>{SCRIPT}</script>\n</body></html>\n")
        finally:
            self._rows.close()
        return self.path
