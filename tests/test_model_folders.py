"""Broken model folders: every one gets exactly one line on stderr and exit code 1, never a
traceback, and the folder is left exactly as it was. Good variants (sharded, tied embeddings,
either tensor naming, a valid pickle) still load, so the checks refuse nothing that is fine.

Most problems are found before loading starts, so stderr holds the error alone. The few that
only loading reveals (weights that do not match the config, a template or tokenizer that
transformers rejects) come after the "loading model" progress line; those tests pass --quiet.
"""

import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import run_cli

QUESTION = "what color is the cup?"


class NotATensor:
    """Pickled into a .bin: torch's safe loader must refuse it."""


def copy_model(tiny_model_dir, tmp_path, name="model"):
    return shutil.copytree(tiny_model_dir, tmp_path / name)


def snapshot(folder):
    """Every entry under ``folder`` with a hash of its bytes (None for folders)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def ask(folder, clip_path, capsys, monkeypatch, *extra):
    return run_cli(["ask", str(clip_path), QUESTION, "--model", str(folder), "--max-new-tokens", "2", *extra],
                   capsys, monkeypatch)


def assert_refused(folder, message, clip_path, capsys, monkeypatch, *extra):
    before = snapshot(folder)
    assert ask(folder, clip_path, capsys, monkeypatch, *extra) == (1, "", f"dycoke: error: {message}\n")
    assert snapshot(folder) == before


def assert_answers(folder, clip_path, capsys, monkeypatch, *extra):
    before = snapshot(folder)
    code, out, err = ask(folder, clip_path, capsys, monkeypatch, "--quiet", *extra)
    assert (code, err) == (0, "") and out.strip()
    assert snapshot(folder) == before


def read_header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# --- safetensors files ------------------------------------------------------------------------

def _truncated(st):
    size = st.stat().st_size
    st.write_bytes(st.read_bytes()[:-100])
    header_len = struct.unpack("<Q", st.read_bytes()[:8])[0]
    data = size - 8 - header_len
    return f"truncated safetensors file (its header describes {data} bytes of tensor data, the file holds {data - 100})"


def _cut_in_header(st):
    header_len = struct.unpack("<Q", st.read_bytes()[:8])[0]
    st.write_bytes(st.read_bytes()[:100])
    return f"truncated or corrupt safetensors file (header length {header_len}, file size 100 bytes)"


def _absurd_length(st):
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    return f"truncated or corrupt safetensors file (header length {2**62}, file size {len(raw)} bytes)"


def _not_json(st):
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    st.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])
    return "corrupt safetensors header (not JSON)"


def _json_list(st):
    _, data = read_header(st)
    write_safetensors(st, [1, 2], data)
    return "corrupt safetensors header (not a JSON object)"


def _offsets_past_end(st):
    header, data = read_header(st)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"] = [o + 4096 for o in header[last]["data_offsets"]]
    write_safetensors(st, header, data)
    return f"truncated safetensors file (its header describes {len(data) + 4096} bytes of tensor data, " \
           f"the file holds {len(data)})"


def _unknown_dtype(st):
    header, data = read_header(st)
    header["image_newline"]["dtype"] = "F33"
    write_safetensors(st, header, data)
    return "corrupt safetensors header (tensor 'image_newline' has unknown dtype \"F33\")"


def _wrong_size(st):
    header, data = read_header(st)
    header["image_newline"]["shape"] = [65]
    write_safetensors(st, header, data)
    return "corrupt safetensors header (tensor 'image_newline' has 256 bytes, its dtype and shape need 260)"


def _trailing_bytes(st):
    st.write_bytes(st.read_bytes() + b"\0" * 10)
    return "corrupt safetensors file (10 bytes after the last tensor)"


def _too_short(st):
    st.write_bytes(b"abc")
    return "not a safetensors file (only 3 bytes)"


@pytest.mark.parametrize("breaker", [_truncated, _cut_in_header, _absurd_length, _not_json, _json_list,
                                     _offsets_past_end, _unknown_dtype, _wrong_size, _trailing_bytes, _too_short])
def test_broken_safetensors(breaker, tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    st = folder / "model.safetensors"
    problem = breaker(st)
    assert_refused(folder, f"{st}: {problem}", clip_path, capsys, monkeypatch)


def _shard(folder):
    """Split model.safetensors into two shards and an index; return the index path."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, ks in halves.items() for k in ks}}))
    return index


def test_sharded_checkpoint_loads(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    _shard(folder)
    assert_answers(folder, clip_path, capsys, monkeypatch)


def test_sharded_checkpoint_with_a_missing_shard(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    index = _shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert_refused(folder, f"{index}: names a missing shard 'model-00002-of-00002.safetensors'",
                   clip_path, capsys, monkeypatch)


@pytest.mark.parametrize("text,problem", [
    ("{not json", "unreadable index (invalid JSON: Expecting property name enclosed in double quotes at line 1, "
                  "column 2)"),
    ('{"metadata": {}}', "no weight_map (a JSON object of tensor name -> shard file)"),
    ('{"weight_map": {"a": 3}}', "weight_map values must be shard file names"),
    ('{"weight_map": {"a": "../model.safetensors"}}', "names a shard outside the folder ('../model.safetensors')"),
])
def test_broken_shard_index(text, problem, tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    index = _shard(folder)
    index.write_text(text)
    assert_refused(folder, f"{index}: {problem}", clip_path, capsys, monkeypatch)


# --- dycoke.json --------------------------------------------------------------------------------

@pytest.mark.parametrize("content,problem", [
    ([8, 2], "unreadable DyCoke defaults (a JSON list, not an object)"),
    ("eight", "unreadable DyCoke defaults (a JSON string, not an object)"),
    ({"num_frames": "eight"}, 'num_frames must be an integer >= 1 (got "eight")'),
    ({"num_frames": 0}, "num_frames must be an integer >= 1 (got 0)"),
    ({"num_frames": -4}, "num_frames must be an integer >= 1 (got -4)"),
    ({"num_frames": 8.0}, "num_frames must be an integer >= 1 (got 8.0)"),
    ({"num_frames": True}, "num_frames must be an integer >= 1 (got true)"),
    ({"num_frames": None}, "num_frames must be an integer >= 1 (got null)"),
    ({"prune_layer": -1}, "prune_layer must be an integer in [1, 3] for this 4-layer model (got -1)"),
    ({"prune_layer": 4}, "prune_layer must be an integer in [1, 3] for this 4-layer model (got 4)"),
    ({"prune_layer": 2.5}, "prune_layer must be an integer in [1, 3] for this 4-layer model (got 2.5)"),
    ({"ttm_k": 1.0}, "ttm_k must be a number in [0, 1) (got 1.0)"),
    ({"ttm_k": "0.7"}, 'ttm_k must be a number in [0, 1) (got "0.7")'),
    ({"ttm_k": float("nan")}, "ttm_k must be a number in [0, 1) (got NaN)"),
    ({"prune_p": -0.1}, "prune_p must be a number in [0, 1) (got -0.1)"),
    ({"prune_p": False}, "prune_p must be a number in [0, 1) (got false)"),
    ({"positions": "shuffled"}, 'positions must be one of contiguous, original (got "shuffled")'),
    ({"caption_prompt": ""}, 'caption_prompt must be a non-empty string (got "")'),
    ({"caption_prompt": 7}, "caption_prompt must be a non-empty string (got 7)"),
    ({"fps": 0}, "fps must be a number in (0, 240] (got 0)"),
    ({"fps": "2"}, 'fps must be a number in (0, 240] (got "2")'),
    ({"fps": 1000}, "fps must be a number in (0, 240] (got 1000)"),
    ({"min_frames": 0}, "min_frames must be an integer >= 1 (got 0)"),
    ({"max_frames": 2.5}, "max_frames must be an integer >= 1 (got 2.5)"),
    ({"fps": 2, "min_frames": 9, "max_frames": 8}, "min_frames must be at most max_frames (or num_frames) (9 > 8)"),
    ({"fps": 2, "min_frames": 9, "num_frames": 8}, "min_frames must be at most max_frames (or num_frames) (9 > 8)"),
])
def test_bad_dycoke_json(content, problem, tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    path = folder / "dycoke.json"
    path.write_text(json.dumps(content))
    assert_refused(folder, f"{path}: {problem}", clip_path, capsys, monkeypatch)


@pytest.mark.parametrize("raw,problem", [
    (b"{num_frames: 8}", "invalid JSON: Expecting property name enclosed in double quotes at line 1, column 2"),
    (b'{"num_frames": 8\n "prune_layer": 2}', "invalid JSON: Expecting ',' delimiter at line 2, column 2"),
    (b"", "invalid JSON: Expecting value at line 1, column 1"),
    (b'{"caption_prompt": "d\xe9crire"}', "not UTF-8 text"),
])
def test_unreadable_dycoke_json(raw, problem, tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    path = folder / "dycoke.json"
    path.write_bytes(raw)
    assert_refused(folder, f"{path}: unreadable DyCoke defaults ({problem})", clip_path, capsys, monkeypatch)


def test_dycoke_json_unknown_keys_are_ignored(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    (folder / "dycoke.json").write_text(json.dumps({"num_frames": 4, "prune_layer": 1, "a_later_knob": [1]}))
    before = snapshot(folder)
    code, out, err = ask(folder, clip_path, capsys, monkeypatch, "--json", "--quiet")
    assert (code, err) == (0, "")
    assert json.loads(out)["options"]["frames"] == 4
    assert snapshot(folder) == before


@pytest.mark.parametrize("defaults,flags,frames", [
    ({"num_frames": 16, "fps": 2}, [], 6),  # the 3.0 s clip: 3.0 x 2
    ({"num_frames": 16, "fps": 2, "max_frames": 5}, [], 5),
    ({"num_frames": 16, "fps": 2, "min_frames": 7}, [], 7),
    ({"num_frames": 4, "fps": 10}, [], 4),  # at most num_frames when no max_frames
    ({"num_frames": 16, "fps": 2}, ["--frames", "3"], 3),  # the flag wins
    ({"num_frames": 5}, [], 5),  # no fps: the count
])
def test_dycoke_json_fps_counts_frames_by_the_clips_length(defaults, flags, frames, tiny_model_dir, clip_path,
                                                           tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    (folder / "dycoke.json").write_text(json.dumps(defaults))
    code, out, err = ask(folder, clip_path, capsys, monkeypatch, *flags, "--json", "--quiet")
    assert (code, err) == (0, "")
    assert json.loads(out)["stats"]["frames"] == frames


# --- pickle weights (--allow-pickle) -------------------------------------------------------------

def _pickle_folder(tiny_model_dir, tmp_path, payload):
    folder = copy_model(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    path = folder / "pytorch_model.bin"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload(tensors), path)
    return folder, path


def test_valid_pickle_loads_with_allow_pickle(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder, _ = _pickle_folder(tiny_model_dir, tmp_path, lambda t: t)
    assert_answers(folder, clip_path, capsys, monkeypatch, "--allow-pickle")


@pytest.mark.parametrize("payload,problem", [
    (lambda t: {**t, "extra": NotATensor()},
     f"refused by torch's safe loader (weights_only=True): it references {__name__}.NotATensor"),
    (lambda t: {**t, "run": shutil.rmtree},
     "refused by torch's safe loader (weights_only=True): it references shutil.rmtree"),
    (lambda t: list(t.values()), "not a PyTorch state dict (a mapping of names to tensors)"),
    (b"not really a pickle", "not a readable PyTorch checkpoint (UnpicklingError; truncated or corrupt?)"),
    (b"", "not a readable PyTorch checkpoint (EOFError; truncated or corrupt?)"),
])
def test_pickle_refused_by_the_safe_loader(payload, problem, tiny_model_dir, clip_path, tmp_path, capsys,
                                           monkeypatch):
    folder, path = _pickle_folder(tiny_model_dir, tmp_path, payload)
    assert_refused(folder, f"{path}: {problem}", clip_path, capsys, monkeypatch, "--allow-pickle")


def test_truncated_pickle(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder, path = _pickle_folder(tiny_model_dir, tmp_path, lambda t: t)
    path.write_bytes(path.read_bytes()[:5000])
    assert_refused(folder, f"{path}: not a readable PyTorch checkpoint (OSError; truncated or corrupt?)",
                   clip_path, capsys, monkeypatch, "--allow-pickle")


# --- weights that do not match the config ----------------------------------------------------------

def _drop_layers(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith(("language_model.model.layers.2.",
                                                                   "language_model.model.layers.3."))}


def _extra_layers(tensors):
    extra = {k.replace("layers.3.", f"layers.{i}."): v.clone() for k, v in tensors.items() if ".layers.3." in k
             for i in (4, 5)}
    return {**tensors, **extra}


def _rename(tensors):
    return {k.replace("mlp.up_proj", "mlp.upproj"): v for k, v in tensors.items()}


def _narrow_mlp(tensors):
    return {k: v[:96] if k.endswith(("gate_proj.weight", "up_proj.weight"))
            else v[:, :96] if k.endswith("down_proj.weight") else v for k, v in tensors.items()}


@pytest.mark.parametrize("edit,problem", [
    (_drop_layers, "24 missing, 0 unexpected tensors (e.g. 'model.language_model.layers.2.input_layernorm.weight')"),
    (_extra_layers, "0 missing, 24 unexpected tensors (e.g. 'model.language_model.layers.4.input_layernorm.weight')"),
    (_rename, "4 missing, 4 unexpected tensors (e.g. 'model.language_model.layers.0.mlp.up_proj.weight')"),
    (_narrow_mlp, "12 tensors have other shapes (e.g. 'model.language_model.layers.0.mlp.down_proj.weight': "
                  "[64, 96] in the weights, [64, 128] in the config)"),
])
def test_weights_that_do_not_match_the_config(edit, problem, tiny_model_dir, clip_path, tmp_path, capsys,
                                              monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    st = folder / "model.safetensors"
    tensors = load_file(st)
    save_file({k: v.contiguous() for k, v in edit(tensors).items()}, st, metadata={"format": "pt"})
    assert_refused(folder, f"{st}: weights do not match the config: {problem}", clip_path, capsys, monkeypatch,
                   "--quiet")


def _current_names(key):
    """The tensor names transformers 5 uses in memory (it saves and reads the older names)."""
    if key.startswith("language_model.lm_head."):
        return key.removeprefix("language_model.")
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    return "model." + key


def test_either_tensor_naming_loads(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    st = folder / "model.safetensors"
    tensors = load_file(st)
    assert "language_model.model.embed_tokens.weight" in tensors  # the names transformers renames on load
    save_file({_current_names(k): v for k, v in tensors.items()}, st, metadata={"format": "pt"})
    assert_answers(folder, clip_path, capsys, monkeypatch)


def test_tied_embeddings_are_not_missing(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = cfg["text_config"]["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    st = folder / "model.safetensors"
    save_file({k: v for k, v in load_file(st).items() if "lm_head" not in k}, st, metadata={"format": "pt"})
    assert_answers(folder, clip_path, capsys, monkeypatch)


def test_the_demo_model_loads_cleanly(clip_path, capsys, monkeypatch):
    code, out, err = run_cli(["ask", str(clip_path), QUESTION, "--model", "demo", "--max-new-tokens", "2",
                              "--quiet"], capsys, monkeypatch)
    assert (code, err) == (0, "") and out.strip()


# --- config.json and the other small files ----------------------------------------------------------

@pytest.mark.parametrize("edit,problem", [
    (lambda c: c["text_config"].update(num_hidden_layers="x"),
     'text_config.num_hidden_layers must be a positive integer (got "x")'),
    (lambda c: c["text_config"].update(hidden_size=-64),
     "text_config.hidden_size must be a positive integer (got -64)"),
    (lambda c: c["vision_config"].update(patch_size=0), "vision_config.patch_size must be a positive integer (got 0)"),
    (lambda c: c["vision_config"].update(image_size=32.5),
     "vision_config.image_size must be a positive integer (got 32.5)"),
    (lambda c: c.update(vision_config=[1]), "vision_config must be a JSON object (got a list)"),
    (lambda c: c.update(video_token_index="5"), 'video_token_index must be a non-negative integer (got "5")'),
])
def test_config_with_garbage_values(edit, problem, tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    assert_refused(folder, f"{path}: {problem}", clip_path, capsys, monkeypatch)


def test_config_garbage_that_transformers_refuses(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["text_config"]["num_attention_heads"] = 5  # 64 is not a multiple of 5
    path.write_text(json.dumps(cfg))
    st = folder / "model.safetensors"
    assert_refused(folder, f"{st}: weights do not match the config: 28 tensors have other shapes (e.g. "
                   "'model.language_model.layers.0.self_attn.k_proj.bias': [32] in the weights, [24] in the config)",
                   clip_path, capsys, monkeypatch, "--quiet")


@pytest.mark.parametrize("raw,problem", [
    (b"{", "unreadable config (invalid JSON: Expecting property name enclosed in double quotes at line 1, column 2)"),
    (b"[]", "unreadable config (a JSON list, not an object)"),
    (b'{"model_type": "llava_onevision\xff"}', "unreadable config (not UTF-8 text)"),
])
def test_unreadable_config(raw, problem, tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    (folder / "config.json").write_bytes(raw)
    assert_refused(folder, f"{folder / 'config.json'}: {problem}", clip_path, capsys, monkeypatch)


def test_unhashable_model_type(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": ["llava_onevision"]}))
    assert_refused(folder, f"{folder}: unsupported model type ['llava_onevision'] (supported: llava_onevision, qwen2_5_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe)",
                   clip_path, capsys, monkeypatch)


@pytest.mark.parametrize("name,raw,problem", [
    ("video_preprocessor_config.json", b"{", "unreadable preprocessor config (invalid JSON: Expecting property "
                                             "name enclosed in double quotes at line 1, column 2)"),
    ("video_preprocessor_config.json", b'{"size": {"height": "x", "width": 32}}',
     "unreadable preprocessor config (ValueError)"),
    ("video_preprocessor_config.json", b'{"size": {"height": 0, "width": 32}}',
     "bad preprocessor config (size must be positive, image_mean and image_std three finite numbers, "
     "image_std non-zero)"),
    ("chat_template.jinja", b"\xff\xfe", "unreadable chat template (not UTF-8 text)"),
    ("tokenizer.json", b"{ not json", "unreadable tokenizer (invalid JSON: Expecting property name enclosed in "
                                      "double quotes at line 1, column 3)"),
    ("tokenizer_config.json", b"[]", "unreadable tokenizer config (a JSON list, not an object)"),
    ("generation_config.json", b'"eos"', "unreadable generation config (a JSON string, not an object)"),
])
def test_broken_small_files(name, raw, problem, tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    (folder / name).write_bytes(raw)
    assert_refused(folder, f"{folder / name}: {problem}", clip_path, capsys, monkeypatch)


def test_broken_chat_template(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    (folder / "chat_template.jinja").write_text("{% for message in messages %}{{ message")
    before = snapshot(folder)
    code, out, err = ask(folder, clip_path, capsys, monkeypatch, "--quiet")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(f"dycoke: error: {folder}: the chat template fails (")
    assert snapshot(folder) == before


def test_broken_tokenizer(tiny_model_dir, clip_path, tmp_path, capsys, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"model": 3}')  # JSON, but no tokenizer
    before = snapshot(folder)
    code, out, err = ask(folder, clip_path, capsys, monkeypatch, "--quiet")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(f"dycoke: error: {folder}: cannot load the model (")
    assert snapshot(folder) == before
