"""scripts/convert_hf_checkpoint.py and scripts/download.py, offline.

Tiny random HF models (Llama GQA; llama3 RoPE scaling saved as sharded safetensors; linear RoPE scaling with a
transformers-4.x config and a pytorch_model.bin; tied embeddings with an explicit head_dim; Qwen2 with biases;
Mistral) are saved with save_pretrained, converted by the real script in subprocesses, loaded with model.load_model and compared logit for logit with transformers (the reference, test
only): a full prefill, then a short prefill followed by one-token decode steps through a FullCache.
"""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import convert_hf_checkpoint as conv  # noqa: E402
import download as dl  # noqa: E402

from cache import FullCache  # noqa: E402
from model import load_model  # noqa: E402

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
T = 40  # > original_max_position_embeddings (16) of the rope-scaling variants
PREFILL = 12  # decode test: prefill this many tokens, then one-token steps
TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=300, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
MEASURED = {}  # variant -> (prefill max |diff|, decode max |diff|, max |logit|), printed at the end with -s


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(OMP_NUM_THREADS="1", **extra)  # several run at once: no thread oversubscription
    return env


def run_scripts(*calls, env=None):
    """Run several script invocations [(script, *args), ...] at once (each pays the torch import); in order."""
    procs = [subprocess.Popen([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=REPO,
                              env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, *args in calls]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def run_script(name, *args, env=None):
    return run_scripts((name, *args), env=env)[0]


def convert(folder, *extra):
    return ("convert_hf_checkpoint.py", "--checkpoint_dir", folder, *extra)


def convert_in_process(capsys, folder, *extra):
    """The script's main() in this process (no second torch import): (exit code, stderr)."""
    capsys.readouterr()
    sys.argv = ["convert_hf_checkpoint.py", "--checkpoint_dir", str(folder), *extra]
    try:
        conv.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return subprocess.CompletedProcess(sys.argv, code, "", capsys.readouterr().err)


def _randomize(model, seed):
    """Weights large enough that logits are O(1..10) and every tensor (biases included) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model.eval()


def _variants():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    llama3_rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16)
    return {
        "llama_gqa": LlamaConfig(**TINY),
        "llama3_rope": LlamaConfig(**TINY, rope_scaling=llama3_rope),
        "linear_rope": LlamaConfig(**TINY, rope_scaling=dict(rope_type="linear", factor=4.0)),
        "tied": LlamaConfig(**{**TINY, "head_dim": 32}, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**TINY),
        "mistral": MistralConfig(**TINY, sliding_window=128),
    }


def _save(name, model, folder: Path):
    if name == "llama3_rope":  # sharded safetensors + index, like the real Llama-3.1 repos
        model.save_pretrained(folder, max_shard_size="20KB")
        assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    elif name == "linear_rope":  # pytorch_model.bin, as older hub repos have (transformers 5 writes safetensors)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if name == "linear_rope":  # transformers 4.x layout: rope_theta + rope_scaling with the old "type" key
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params["rope_theta"]
        cfg["rope_scaling"] = {"type": "linear", "factor": params["factor"]}
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if name == "tied":  # a tied checkpoint that still stores lm_head.weight: the converter must drop it
        from safetensors.torch import load_file, save_file
        sd = load_file(folder / "model.safetensors")
        assert "lm_head.weight" not in sd
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    if name == "llama_gqa":  # Llama-3-style tokenizer files and generation config
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}"}))
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
        (folder / "original").mkdir()
        (folder / "original" / "tokenizer.model").write_bytes(b"dummy tiktoken file")
    if name == "mistral":
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"add_bos_token": True, "chat_template": "{{ '[INST] ' + message['content'] + ' [/INST]' }}"}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (folder, HF model, reference logits [1, T, V], ids); all conversions run in parallel subprocesses."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, cfg) in enumerate(_variants().items()):
        cfg._attn_implementation = "eager"
        torch.manual_seed(i)
        model = _randomize(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed=100 + i)
        folder = root / name
        _save(name, model, folder)
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            ref = model(ids).logits.float()
        out[name] = (folder, model, ref, ids)
    for name, r in zip(out, run_scripts(*(convert(out[name][0]) for name in out))):
        assert r.returncode == 0, f"{name}: {r.stderr}"
    return out


def _full_cache(cfg, length):
    kw = {"max_seq_length": length} if "max_seq_length" in inspect.signature(FullCache).parameters else {}
    return FullCache(1, cfg.n_local_heads, cfg.head_dim, length, torch.float32, **kw)


def _engine_logits(folder, ids, rope_scaling="keep"):
    m = load_model(folder, "cpu", torch.float32)
    cfg = m.config
    if rope_scaling != "keep":
        cfg.rope_scaling = rope_scaling
    fresh = lambda: m.setup_caches(T, lambda i: _full_cache(cfg, T))
    with torch.no_grad():
        fresh()
        prefill = m(ids, torch.arange(T), prefill=True)
        fresh()
        first = m(ids[:, :PREFILL], torch.arange(PREFILL), prefill=True)
        steps = [m(ids[:, i:i + 1], torch.tensor([i])) for i in range(PREFILL, T)]
    return prefill, torch.cat([first] + steps, dim=1)


VARIANTS = ["llama_gqa", "llama3_rope", "linear_rope", "tied", "qwen2", "mistral"]


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(models, name):
    folder, _, ref, ids = models[name]
    prefill, decode = _engine_logits(folder, ids)
    d_prefill = (prefill - ref).abs().max().item()
    d_decode = (decode - ref).abs().max().item()
    MEASURED[name] = (d_prefill, d_decode, ref.abs().max().item())
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert d_prefill < ATOL, f"{name}: prefill logits differ by {d_prefill}"
    assert d_decode < ATOL, f"{name}: decode logits differ by {d_decode}"


@pytest.mark.parametrize("name", ["llama3_rope", "linear_rope"])
def test_rope_scaling_matters(models, name):
    """Ignoring the scaling would be caught: without it the engine's logits are far from transformers'."""
    folder, _, ref, ids = models[name]
    unscaled, _ = _engine_logits(folder, ids, rope_scaling=None)
    gap = (unscaled - ref).abs().max().item()
    MEASURED[name + " unscaled"] = (gap, float("nan"), ref.abs().max().item())
    assert gap > 100 * ATOL


def test_written_config(models):
    def cfg(name):
        return json.loads((models[name][0] / "config.json").read_text())

    c = cfg("llama_gqa")
    assert (c["arch"], c["n_head"], c["n_local_heads"], c["head_dim"], c["dim"]) == ("llama", 4, 2, 16, 64)
    assert c["rope_scaling"] is None and c["rope_base"] == 10000.0 and c["block_size"] == 256
    assert c["eos_ids"] == [2, 7] and c["bos_id"] == 1 and c["chat_format"] == "llama3" and c["add_bos"] is True
    assert c["name"] == "llama_gqa" and c["norm_eps"] == 1e-5 and c["tie_word_embeddings"] is False
    assert (models["llama_gqa"][0] / "tokenizer.model").read_bytes() == b"dummy tiktoken file"
    assert cfg("llama3_rope")["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    assert cfg("linear_rope")["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    t = cfg("tied")
    assert t["tie_word_embeddings"] is True and t["head_dim"] == 32
    q = cfg("qwen2")
    assert q["arch"] == "qwen2" and q["attention_bias"] is True and q["chat_format"] == "chatml"
    assert q["add_bos"] is False
    m = cfg("mistral")
    assert m["arch"] == "mistral" and m["chat_format"] == "llama2" and m["add_bos"] is True
    assert m["block_size"] == 128  # capped at the sliding window (full attention is exact up to it)
    for name in VARIANTS:
        folder = models[name][0]
        hf = json.loads((folder / "hf_config.json").read_text())
        assert hf["model_type"] in ("llama", "qwen2", "mistral")
        assert not (folder / "model.pth.tmp").exists()
    sd = torch.load(models["tied"][0] / "model.pth", weights_only=True)
    assert "output.weight" not in sd
    sd = torch.load(models["qwen2"][0] / "model.pth", weights_only=True)
    assert sd["layers.0.attention.wqkv.bias"].shape == ((4 + 2 * 2) * 16,)


def _one_line_error(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_rerun_and_dtype(models, tmp_path, capsys):
    src = models["llama3_rope"][0]  # sharded
    again, bf16, redownloaded = (tmp_path / n for n in ("again", "bf16", "redownloaded"))
    for folder in (again, bf16, redownloaded):
        shutil.copytree(src, folder)
    # A fresh download puts the HF config.json back over ours: it is taken (and saved) again.
    shutil.copyfile(redownloaded / "hf_config.json", redownloaded / "config.json")
    for r in (run_script(*convert(again)), convert_in_process(capsys, bf16, "--dtype", "bfloat16"),
              convert_in_process(capsys, redownloaded)):
        assert r.returncode == 0, r.stderr
    before = torch.load(src / "model.pth", weights_only=True)
    for folder in (again, redownloaded):
        after = torch.load(folder / "model.pth", weights_only=True)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        ours, ref = (json.loads((f / "config.json").read_text()) for f in (folder, src))
        assert ours == {**ref, "name": folder.name}
        assert json.loads((folder / "hf_config.json").read_text())["model_type"] == "llama"
    sd = torch.load(bf16 / "model.pth", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())


def _hf_folder(models, tmp_path, name, edit=None, weights=True):
    folder = tmp_path / name
    folder.mkdir()
    src = models["llama_gqa"][0]
    cfg = json.loads((src / "hf_config.json").read_text())
    if edit:
        edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    if weights:
        shutil.copyfile(src / "model.safetensors", folder / "model.safetensors")
    return folder


def test_errors_are_one_line(models, tmp_path, capsys):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, bos_token_id=0, eos_token_id=0).save_pretrained(gpt2)
    yarn = _hf_folder(models, tmp_path, "yarn", lambda c: c.update(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))
    # Two as real subprocesses (no Traceback on stderr), the rest through main() in this process (faster).
    results = run_scripts(convert(tmp_path / "nope"), convert(gpt2)) + [
        convert_in_process(capsys, _hf_folder(models, tmp_path, "noweights", weights=False)),
        convert_in_process(capsys, yarn),
        convert_in_process(capsys, _hf_folder(models, tmp_path, "shapes", lambda c: c.update(intermediate_size=96)))]
    missing, unsupported, no_weights, rope, shapes = map(_one_line_error, results)
    assert "nope" in missing
    assert "no weights" in no_weights
    assert "gpt2" in unsupported and "llama" in unsupported
    assert "yarn" in rope and "llama3" in rope and "linear" in rope
    assert "shape" in shapes and "gate_proj" in shapes


@pytest.mark.parametrize("hf,expected", [
    ({"rope_theta": 5e5}, (5e5, None)),
    ({}, (1e4, None)),
    ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     (5e5, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192})),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, (1e4, {"rope_type": "linear", "factor": 2.0})),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, (1e6, None)),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0, "type": "linear"}},
     (1e6, {"rope_type": "linear", "factor": 2.0})),
])
def test_parse_rope(hf, expected):
    assert conv.parse_rope(hf) == expected


@pytest.mark.parametrize("hf", [
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},  # incomplete
])
def test_parse_rope_rejects(hf):
    with pytest.raises(ValueError):
        conv.parse_rope(hf)


def test_o_proj_bias(models, tmp_path, capsys):
    """Llama's attention_bias also puts a bias on o_proj: all-zero is dropped, anything else is refused."""
    from safetensors.torch import load_file, save_file

    folders = [_hf_folder(models, tmp_path, n, lambda c: c.update(attention_bias=True)) for n in ("zero", "nonzero")]
    sd = load_file(folders[0] / "model.safetensors")
    for i in range(2):
        for p in "qkv":
            rows = sd[f"model.layers.{i}.self_attn.{p}_proj.weight"].shape[0]
            sd[f"model.layers.{i}.self_attn.{p}_proj.bias"] = torch.randn(rows)
        sd[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(sd, folders[0] / "model.safetensors")
    sd["model.layers.1.self_attn.o_proj.bias"][3] = 0.5
    save_file(sd, folders[1] / "model.safetensors")
    zero, nonzero = (convert_in_process(capsys, f) for f in folders)
    assert zero.returncode == 0, zero.stderr
    assert json.loads((folders[0] / "config.json").read_text())["attention_bias"] is True
    assert "o_proj.bias" in _one_line_error(nonzero)


def test_weight_files(tmp_path):
    for name in ("consolidated.safetensors", "pytorch_model.bin", "training_args.bin"):
        (tmp_path / name).write_bytes(b"")
    assert conv.weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]  # consolidated.* is Mistral's own format
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert conv.weight_files(tmp_path) == [tmp_path / "model.safetensors"]  # safetensors first
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="missing"):
        conv.weight_files(tmp_path)


def test_tokenizer_hints(tmp_path):
    llama3_post = {"type": "Sequence", "processors": [
        {"type": "ByteLevel"}, {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}]}
    assert conv._template_adds_bos(llama3_post) is True
    assert conv._template_adds_bos({"type": "ByteLevel"}) is None  # Qwen2: no opinion -> the arch rule (False)
    hf = {"model_type": "llama"}
    assert conv.chat_and_bos(hf, tmp_path, 128000) == ("llama3", True)  # Llama-3's bos id
    assert conv.chat_and_bos(hf, tmp_path, 1) == (None, False)  # no tokenizer files at all
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert conv.chat_and_bos(hf, tmp_path, 1) == (None, True)  # sentencepiece Llama-2 style
    (tmp_path / "chat_template.jinja").write_text("{{ '<|im_start|>' + role }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert conv.chat_and_bos(hf, tmp_path, 1) == ("chatml", False)
    assert conv.chat_and_bos({"model_type": "qwen2"}, tmp_path / "none", 151643) == ("chatml", False)


# -- download.py --------------------------------------------------------------------------------------------------

def test_select_files():
    listing = [".gitattributes", "README.md", "LICENSE", "config.json", "generation_config.json",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
               "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
               "consolidated.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "original/tokenizer.model", "original/consolidated.00.pth", "original/params.json", "training_args.bin"]
    assert dl.select_files(listing) == [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "original/tokenizer.model",
        "tokenizer.json", "tokenizer_config.json"]
    bin_only = ["config.json", "pytorch_model.bin", "tokenizer.model", "tokenizer_config.json", "training_args.bin",
                "chat_template.jinja", "flax_model.msgpack"]
    assert dl.select_files(bin_only) == ["chat_template.jinja", "config.json", "pytorch_model.bin",
                                         "tokenizer.model", "tokenizer_config.json"]


def test_download_arguments(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(dl, "download", lambda repo, ckpt, token: seen.append((repo, Path(ckpt), token)) or ckpt)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    dl.main(["org/name", "--checkpoint_dir", str(tmp_path)])
    monkeypatch.setenv("HF_TOKEN", "from-env")
    dl.main(["org/name"])
    dl.main(["org/name", "--hf_token", "from-flag"])
    assert seen == [("org/name", tmp_path, None), ("org/name", REPO / "checkpoints", "from-env"),
                    ("org/name", REPO / "checkpoints", "from-flag")]
    assert dl.local_dir_for("meta-llama/Llama-3.1-8B-Instruct", Path("c")) == Path("c/meta-llama/Llama-3.1-8B-Instruct")


def test_download_errors_are_one_line(models, tmp_path):
    r = run_script("download.py", "not-a-repo-id", "--checkpoint_dir", tmp_path)
    assert "ORG/NAME" in _one_line_error(r)
    r = run_script("download.py", "org/name", "--checkpoint_dir", tmp_path, env=_env(HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE" in _one_line_error(r)
    r = run_script("download.py", "org/name", "--checkpoint_dir", tmp_path, env=_env(HF_ENDPOINT="http://127.0.0.1:9"))
    assert "cannot reach" in _one_line_error(r)
    assert not (tmp_path / "org").exists()
    # Offline with a copy already there: accepted as is.
    shutil.copytree(models["llama_gqa"][0], tmp_path / "org" / "name")
    r = run_script("download.py", "org/name", "--checkpoint_dir", tmp_path, env=_env(HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == tmp_path / "org" / "name"


def test_engine_code_does_not_import_transformers():
    for f in ("convert_hf_checkpoint.py", "download.py"):
        text = (REPO / "scripts" / f).read_text()
        assert not re.search(r"^\s*(import|from)\s+transformers\b", text, re.M)


def test_zz_report():
    for name, (p, d, mx) in MEASURED.items():
        print(f"{name:12s} prefill max|diff| {p:.2e}  decode max|diff| {d:.2e}  max|logit| {mx:.2f}")
