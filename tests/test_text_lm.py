"""Tests of the text side: corpus, WordPiece tokenizer, MLM masking and pretraining,
the SentenceTransformer package and the text features (stages pretrain_lm, embed_text)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from multifusion.text.corpus import build_corpus, load_descriptions, split_sentences
from multifusion.text.encoder import build_sentence_encoder, save_sentence_encoder, text_features
from multifusion.text.features import TextFeatures
from multifusion.text.masking import IGNORE_INDEX, mask_tokens, select_positions
from multifusion.text.pretrain import build_from_scratch, pretrain, save_lm
from multifusion.text.tokenizer import learn_wordpiece_vocab, train_wordpiece

# ---------------------------------------------------------------------------------------
# A small descriptions.parquet in the schema of the describe stage: a few classes x
# templates, real-looking chain-of-thought responses whose last paragraph is the description.

CLASSES = {
    "Nanowires": ("thin elongated wires", "a high aspect ratio", "vapour-liquid-solid growth", "field-effect transistors"),
    "Particles": ("round isolated particles", "a narrow size distribution", "colloidal precipitation", "catalysis and drug delivery"),
    "Porous_Sponge": ("an open network of pores", "a large specific surface area", "templating and foaming", "filtration membranes"),
    "Tips": ("sharp conical tips", "a radius of a few nanometres", "electrochemical etching", "scanning probe microscopy"),
}
TEMPLATES = ("morphology", "synthesis", "distinguish")
REASONING = [
    "Let us think step by step about what a micrograph of {cls} shows.",
    "First, the dominant features are {shape}, which stand out against the background.",
    "Second, these structures usually show {metric} that can be read from the scale bar.",
    "The contrast in the secondary electron image comes from edges and surface topography.",
    "Third, such samples are commonly made by {route} under controlled conditions.",
    "In practice they are used for {use}, which explains why they are imaged so often.",
]
DESCRIPTION = [
    "A scanning electron micrograph of {cls} shows {shape} with {metric}.",
    "The material is typically produced by {route} and is used for {use}.",
    "Compared with other classes, {shape} and {metric} are the clearest cues.",
    "Edges appear bright because more secondary electrons escape from them.",
    "Look for {shape} across the whole field of view rather than in one corner.",
]


def make_descriptions(path: Path, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for cls, (shape, metric, route, use) in CLASSES.items():
        for template in TEMPLATES:
            slots = {"cls": cls.replace("_", " ").lower(), "shape": shape, "metric": metric, "route": route, "use": use}
            reasoning = [s.format(**slots) for s in rng.sample(REASONING, k=5)]
            description = " ".join(s.format(**slots) for s in rng.sample(DESCRIPTION, k=4))
            response = "\n".join(reasoning) + "\n\nFinal description: " + description
            rows.append({
                "class_name": cls, "template": template, "sample": 0, "provider": "curated", "model": "curated-v1",
                "prompt": f"Describe {cls} ({template}).", "response": response, "key": f"{cls}-{template}-0",
                "description": description,
            })
    frame = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return frame


SMALL = {"text.hidden": 64, "text.intermediate": 128, "text.layers": 2, "text.heads": 2, "text.vocab_size": 400,
         "text.batch_size": 16, "text.max_length": 64, "text.warmup_steps": 10}


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    path = tmp_path_factory.mktemp("describe") / "descriptions.parquet"
    return path, make_descriptions(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, descriptions):
    """One short pretraining run shared by the tests below: (config, result, lm_dir)."""
    from multifusion.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", {**SMALL, "text.steps": 150, "text.lr": 0.005})
    corpus = build_corpus(load_descriptions(descriptions[0]), cfg.text.heldout, cfg.seed)
    log: list[tuple[int, dict]] = []
    result = pretrain(cfg.text, cfg.seed, corpus, log=lambda step, m: log.append((step, m)))
    lm_dir = tmp_path_factory.mktemp("lm") / "text_lm"
    save_lm(result, lm_dir)
    return cfg, result, lm_dir, log


# ---------------------------------------------------------------------------------------
# corpus


def test_split_sentences_drops_markers_and_fragments():
    text = "First, the wires are thin. They grow fast!\n- A bullet point here\n2) numbered item text\nOk."
    assert split_sentences(text) == ["First, the wires are thin.", "They grow fast!", "A bullet point here", "numbered item text"]


def test_corpus_is_deduplicated_disjoint_and_seeded(descriptions):
    frame = load_descriptions(descriptions[0])
    corpus = build_corpus(frame, heldout=0.2, seed=3)
    assert not set(corpus.train) & set(corpus.heldout)
    assert len(set(corpus.train)) == len(corpus.train)
    every = {s for col in ("response", "description") for t in frame[col] for s in split_sentences(t)}
    assert set(corpus.train) | set(corpus.heldout) == every
    assert abs(len(corpus.heldout) - 0.2 * len(every)) <= 1
    assert build_corpus(frame, 0.2, 3) == corpus and build_corpus(frame, 0.2, 4) != corpus


def test_load_descriptions_names_the_problem(tmp_path, descriptions):
    with pytest.raises(FileNotFoundError, match="dvc repro describe"):
        load_descriptions(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    descriptions[1].drop(columns=["description"]).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad\.parquet: missing column\(s\) description"):
        load_descriptions(bad)


# ---------------------------------------------------------------------------------------
# tokenizer


def test_wordpiece_vocab_follows_merge_order():
    """Sennrich et al.'s example: merges by pair frequency, ties by the pieces' text."""
    counts = Counter({"low": 5, "lower": 2, "newest": 6, "widest": 3})
    alphabet = sorted(set("lowernstid"))
    vocab = learn_wordpiece_vocab(counts, vocab_size=5 + 2 * len(alphabet) + 6)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab[5:25] == alphabet + ["##" + c for c in alphabet]
    # ##e+##s (9) ties ##s+##t (9): "##e" < "##s"; then ##o+##w (7) ties l+##o (7): "#" < "l"
    assert vocab[25:] == ["##es", "##est", "##ow", "low", "##ew", "##ewest"]
    with pytest.raises(ValueError, match="raise text.vocab_size"):
        learn_wordpiece_vocab(counts, vocab_size=10)


def test_tokenizer_round_trip(tmp_path, descriptions):
    from transformers import AutoTokenizer

    corpus = build_corpus(load_descriptions(descriptions[0]), 0.15, 0)
    tokenizer = train_wordpiece(corpus.train, vocab_size=400, max_length=64)
    assert len(tokenizer) <= 400
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    for sentence in corpus.train[:20] + ["Nanowires show a high aspect ratio and sharp conical tips."]:
        ids = loaded(sentence)["input_ids"]
        assert ids == tokenizer(sentence)["input_ids"]
        assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id
        assert loaded.unk_token_id not in ids
        decoded = loaded.decode(ids, skip_special_tokens=True)  # BERT decoding may space out punctuation
        assert "".join(decoded.split()) == "".join(sentence.lower().split())
        enc = loaded(sentence, return_offsets_mapping=True)
        pieces = loaded.convert_ids_to_tokens(enc["input_ids"])[1:-1]
        spans = [sentence[a:b].lower() for a, b in enc["offset_mapping"][1:-1]]
        assert [p.removeprefix("##") for p in pieces] == spans
    # a word never seen is split into known pieces, not lost
    pieces = loaded.tokenize("nanoparticles")
    assert len(pieces) > 1 and pieces[1].startswith("##")


# ---------------------------------------------------------------------------------------
# masking


def _batch_of_words(B: int, words: int, pieces: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[CLS] w0 w0 w1 w1 ... [SEP] [PAD]: ids (B, L), word_ids (B, L), special (B, L)."""
    L = words * pieces + 3
    ids = torch.randint(5, 100, (B, L))
    word_ids = torch.full((B, L), -1)
    word_ids[:, 1 : 1 + words * pieces] = torch.arange(words).repeat_interleave(pieces)
    special = word_ids < 0
    ids[special] = 0
    return ids, word_ids, special


@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_rates_and_targets(whole_word):
    ids, word_ids, special = _batch_of_words(B=400, words=30, pieces=3)
    gen = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, word_ids, special, 0.15, whole_word, mask_token_id=4, vocab_size=100, generator=gen)
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any()
    assert (labels[selected] == ids[selected]).all() and (masked[~selected] == ids[~selected]).all()
    assert abs(selected[~special].float().mean().item() - 0.15) < 0.01
    frac_mask = (masked[selected] == 4).float().mean().item()
    frac_same = (masked[selected] == ids[selected]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02 and 0.08 < frac_same < 0.13  # 10 % kept + random hits on itself
    if whole_word:  # every word is all-in or all-out
        per_word = selected[:, 1:-2].reshape(400, 30, 3)
        assert (per_word.all(-1) | ~per_word.any(-1)).all()


def test_masking_selects_at_least_one_per_sequence_and_is_seeded():
    ids, word_ids, special = _batch_of_words(B=64, words=2, pieces=2)
    for whole_word in (False, True):
        sel = select_positions(word_ids, ~special, 0.01, whole_word, torch.Generator().manual_seed(1))
        assert (sel.sum(1) >= 1).all() and not (sel & special).any()
    a = mask_tokens(ids, word_ids, special, 0.3, False, 4, 100, torch.Generator().manual_seed(5))
    b = mask_tokens(ids, word_ids, special, 0.3, False, 4, 100, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------
# pretraining


def test_heldout_perplexity_falls_well_below_untrained(trained):
    cfg, result, lm_dir, log = trained
    assert result.perplexity_after < 0.3 * result.perplexity_before, (result.perplexity_before, result.perplexity_after)
    assert log[0] == (0, {"heldout_perplexity": result.perplexity_before})
    assert log[-1][0] == cfg.text.steps and log[-1][1]["mlm_loss"] < 5.0


def test_saved_lm_loads_offline_and_matches(trained):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    cfg, result, lm_dir, _ = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(lm_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir), local_files_only=True)
    model = AutoModelForMaskedLM.from_pretrained(str(lm_dir), local_files_only=True).eval()
    enc = tokenizer(["Nanowires show a high aspect ratio."], return_tensors="pt")
    with torch.no_grad():
        expected = result.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, expected)


def test_same_seed_gives_identical_model(make_config, descriptions):
    cfg = make_config({**SMALL, "text.steps": 6, "text.whole_word_mask": True})
    corpus = build_corpus(load_descriptions(descriptions[0]), cfg.text.heldout, cfg.seed)
    runs = [pretrain(cfg.text, seed, corpus) for seed in (7, 7, 8)]
    a, b, c = (r.model.state_dict() for r in runs)
    assert runs[0].tokenizer.get_vocab() == runs[1].tokenizer.get_vocab()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].perplexity_after == runs[1].perplexity_after
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_continue_pretraining_from_local_base_model(tmp_path, make_config, descriptions):
    """A tiny 'pretrained' BERT with its own tokenizer, saved to disk, then domain-adapted."""
    base_text = make_config({**SMALL, "text.vocab_size": 300}).text
    generic = ["The sample was imaged at high magnification in the microscope.",
               "Surfaces of materials show grains, pores, wires and particles.",
               "Electrons scattered from the specimen form the image on the detector."] * 5
    base_model, base_tokenizer = build_from_scratch(base_text, generic)
    base_dir = tmp_path / "base"
    base_model.save_pretrained(str(base_dir))
    base_tokenizer.save_pretrained(str(base_dir))

    cfg = make_config({**SMALL, "text.base_model": str(base_dir), "text.steps": 40, "text.lr": 0.002})
    corpus = build_corpus(load_descriptions(descriptions[0]), cfg.text.heldout, cfg.seed)
    result = pretrain(cfg.text, cfg.seed, corpus)
    assert result.tokenizer.get_vocab() == base_tokenizer.get_vocab()   # the base's own tokenizer, not a new one
    assert result.model.config.vocab_size == base_model.config.vocab_size
    assert result.perplexity_after < 0.7 * result.perplexity_before

    missing = make_config({**SMALL, "text.base_model": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="text.base_model: .*nowhere is not a local Hugging Face model directory"):
        pretrain(missing.text, 0, corpus)


# ---------------------------------------------------------------------------------------
# sentence encoder and text features


def test_sentence_encoder_offline_and_text_features(tmp_path, monkeypatch, trained, descriptions):
    from sentence_transformers import SentenceTransformer

    cfg, _, lm_dir, _ = trained
    frame = descriptions[1]
    torch.manual_seed(0)
    encoder = build_sentence_encoder(lm_dir, cfg.text.max_length)
    save_sentence_encoder(encoder, tmp_path / "text_encoder")
    features = text_features(encoder, frame, batch_size=5)
    features.save(tmp_path / "text_features")

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = SentenceTransformer(str(tmp_path / "text_encoder"), device="cpu")
    embeddings = loaded.encode(frame["description"].tolist(), convert_to_tensor=True, batch_size=4)

    T, L, D = features.token_states.shape
    assert (T, D) == (len(frame), cfg.text.hidden) and L <= cfg.text.max_length
    torch.testing.assert_close(features.sentence_embeddings, embeddings, atol=1e-5, rtol=1e-4)
    # the sentence embedding is the mean of the token states over real tokens
    mask = features.attention_mask[..., None].float()
    torch.testing.assert_close((features.token_states * mask).sum(1) / mask.sum(1), features.sentence_embeddings, atol=1e-5, rtol=1e-4)
    assert (features.token_states[~features.attention_mask] == 0).all()

    back = TextFeatures.load(tmp_path / "text_features")
    assert back.class_names == frame["class_name"].tolist() and back.templates == frame["template"].tolist()
    assert back.samples == frame["sample"].tolist()
    assert torch.equal(back.token_states, features.token_states) and torch.equal(back.attention_mask, features.attention_mask)


def test_text_features_truncate_to_max_length(trained, descriptions):
    cfg, _, lm_dir, _ = trained
    encoder = build_sentence_encoder(lm_dir, max_length=16)
    features = text_features(encoder, descriptions[1].head(3), batch_size=2)
    assert features.token_states.shape[:2] == (3, 16) and features.attention_mask.all()


def test_encoder_refuses_missing_lm(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `dvc repro pretrain_lm` first"):
        build_sentence_encoder(tmp_path, 32)


# ---------------------------------------------------------------------------------------
# the DVC stages


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_dvc_reruns_text_stages_on_new_descriptions_not_on_hnf_params(tmp_path, repo_root):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "stages", "src"):
        src = repo_root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["text"].update({"steps": 20, "hidden": 32, "intermediate": 64, "heads": 2, "vocab_size": 300})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_descriptions(repo / "data" / "descriptions.parquet")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    _dvc(repo, "config", "core.check_update", "false")
    # dvclive 3.49 raises "Empty git repo" inside a stage of a repository without commits
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)

    start = time.perf_counter()
    _dvc(repo, "repro", "--single-item", "pretrain_lm")
    _dvc(repo, "repro", "--single-item", "embed_text")
    assert (repo / "metrics" / "lm.json").is_file()
    assert TextFeatures.load(repo / "data" / "text_features").token_states.shape[0] == 12
    assert "up to date" in _dvc(repo, "status", "pretrain_lm", "embed_text")

    params["hnf"]["layers"] = params["hnf"]["layers"] + 1
    params["hnf"]["dim"] = params["hnf"]["dim"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "up to date" in _dvc(repo, "status", "pretrain_lm", "embed_text")

    make_descriptions(repo / "data" / "descriptions.parquet", seed=1)
    status = _dvc(repo, "status", "pretrain_lm", "embed_text")
    assert "pretrain_lm:" in status and "embed_text:" in status and "data/descriptions.parquet" in status
    print(f"dvc round trip {time.perf_counter() - start:.1f} s")
