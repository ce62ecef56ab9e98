"""Checkpoint files: hostile files refused, official yaml, payload extraction, config inference,
the strict suffix-matching loader, round trips, atomic saving."""

from __future__ import annotations

import builtins
import zipfile

import pytest
import torch
import yaml

from php_runner.model.checkpoint import (
    CheckpointError,
    config_to_dict,
    extract_state_dict,
    infer_config,
    load_checkpoint_file,
    load_model,
    load_state_dict_checked,
    read_official_yaml,
    save_atomic,
)
from php_runner.model.config import PHPConfig
from php_runner.model.precision import apply_precision

OFFICIAL_YAML = """\
MLM: false
aux_factor: 0.5
cnum: 3
img_size: !!python/tuple
- 48
- 24
milestones: !!python/tuple
- 20
- 50
moe_heads: 2
moe_layers: 2
num_experts: 4
stride_size: 8
topk: 2
loss_names: sdm+itc+aux
"""


class _WritesMarker:
    """Unpickling this object runs code that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _one_line(error):
    return "\n" not in str(error.value)


def test_hostile_pth_is_refused_without_side_effects(tmp_path):
    proof_marker, marker = tmp_path / "proof", tmp_path / "marker"
    proof = tmp_path / "proof.pth"
    torch.save({"model": {}, "payload": _WritesMarker(proof_marker)}, proof)
    torch.load(proof, weights_only=False)  # the payload is live: an unsafe load runs it
    assert proof_marker.exists()

    hostile = tmp_path / "best.pth"
    torch.save({"model": {}, "payload": _WritesMarker(marker)}, hostile)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(hostile)
    assert _one_line(error) and str(hostile) in str(error.value)
    with pytest.raises(CheckpointError):
        load_model(hostile)
    assert not marker.exists()


def test_hostile_yaml_is_refused_without_side_effects(tmp_path):
    proof_marker, marker = tmp_path / "proof", tmp_path / "marker"
    payload = "name: php\nx: !!python/object/apply:builtins.exec [\"open({!r}, 'w').write('pwned')\"]\n"
    yaml.unsafe_load(payload.format(str(proof_marker)))  # live under an unsafe loader
    assert proof_marker.exists()

    hostile = tmp_path / "configs.yaml"
    hostile.write_text(payload.format(str(marker)))
    with pytest.raises(CheckpointError) as error:
        read_official_yaml(hostile)
    assert _one_line(error) and str(hostile) in str(error.value)
    assert not marker.exists()


def test_python_object_tag_is_refused(tmp_path):
    path = tmp_path / "configs.yaml"
    path.write_text("a: !!python/object:argparse.Namespace {x: 1}\n")
    with pytest.raises(CheckpointError) as error:
        read_official_yaml(path)
    assert _one_line(error)


def test_official_yaml_reads_tuples(tmp_path):
    path = tmp_path / "configs.yaml"
    path.write_text(OFFICIAL_YAML)
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(OFFICIAL_YAML)  # why a dedicated loader is needed
    values = read_official_yaml(path)
    assert values["img_size"] == (48, 24) and values["milestones"] == (20, 50)
    assert values["loss_names"] == "sdm+itc+aux" and values["MLM"] is False


def test_missing_and_malformed_files_give_one_line_errors(tmp_path):
    for call in (load_checkpoint_file, read_official_yaml):
        with pytest.raises(CheckpointError) as error:
            call(tmp_path / "absent")
        assert _one_line(error)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(CheckpointError) as error:
        read_official_yaml(bad)
    assert _one_line(error)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(CheckpointError):
        load_checkpoint_file(not_dict)


def _zip_without_data_pkl(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")


def _truncated_checkpoint(path):
    torch.save({"model": {"w": torch.zeros(64)}}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    "write, reason",
    [
        (lambda path: path.write_text("root:x:0:0:root:/root:/bin/bash\n"), "neither a torch.save zip archive"),
        (lambda path: path.write_bytes(b""), "empty file"),
        (_zip_without_data_pkl, "zip archive without data.pkl"),
        (_truncated_checkpoint, "damaged or truncated zip archive"),
    ],
    ids=["text", "empty", "zip", "truncated"],
)
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path, write, reason):
    path = tmp_path / "best.pth"
    write(path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_file(path)
    assert _one_line(error)
    assert str(error.value).startswith(f"{path}: not a PyTorch checkpoint (") and reason in str(error.value)


def test_both_torch_save_formats_load(tmp_path):
    for zipped in (True, False):
        path = tmp_path / f"zipped_{zipped}.pth"
        torch.save({"model": {"w": torch.ones(2)}}, path, _use_new_zipfile_serialization=zipped)
        assert torch.equal(load_checkpoint_file(path)["model"]["w"], torch.ones(2))


def test_extract_state_dict_strips_module_prefix_only_when_every_key_has_it():
    weights = {"module.a.weight": torch.zeros(1), "module.b": torch.ones(1)}
    assert set(extract_state_dict({"model": weights})) == {"a.weight", "b"}
    mixed = {"module.a.weight": torch.zeros(1), "b": torch.ones(1)}
    assert set(extract_state_dict({"model": mixed})) == set(mixed)
    assert set(extract_state_dict(dict(weights))) == {"a.weight", "b"}
    with pytest.raises(CheckpointError):
        extract_state_dict({"model": {"a": 1}})


@pytest.mark.parametrize("sharing", ["shared", "separate"])
def test_infer_config_reads_the_paper_architecture(sharing, default_meta_model):
    state = default_meta_model(sharing=sharing).state_dict()
    assert infer_config(state) == PHPConfig(sharing=sharing)
    assert infer_config(state, {"moe_heads": 4, "topk": 1}).efp_heads == 4
    with pytest.raises(CheckpointError) as error:
        infer_config(state, {"img_size": (256, 128)})
    assert "positional_embedding" in str(error.value) and _one_line(error)
    with pytest.raises(CheckpointError):
        infer_config(state, {"cnum": 6})


def test_infer_config_reads_num_classes(default_meta_model):
    assert infer_config(default_meta_model(num_classes=3102).state_dict()).num_classes == 3102


def _official_payload(model, counters: bool, module_prefix: bool):
    """Shaped like an official best.pth: fp16 layout, optional R1 buffers and DataParallel prefix."""
    apply_precision(model, "official")
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value.clone()
        if counters and key.endswith("feed_forward.alpha"):
            block = key[: -len("alpha")]
            state[block + "expert_count_accum"] = torch.tensor([5, 1, 0, 2])
            state[block + "token_count_accum"] = torch.tensor([8])
    if module_prefix:
        state = {"module." + key: value for key, value in state.items()}
    apply_precision(model, "amp")
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 37, "num_epoch": 60,
            "scheduler": {"base_lrs": [3e-6, 6e-6], "milestones": (20, 50)}}


@pytest.mark.parametrize("counters", [False, True])
@pytest.mark.parametrize("module_prefix", [False, True])
def test_official_style_checkpoint_loads(counters, module_prefix, tiny_model, tiny_images, tmp_path):
    source = tiny_model()
    path, yaml_path = tmp_path / "best.pth", tmp_path / "configs.yaml"
    torch.save(_official_payload(source, counters, module_prefix), path)
    yaml_path.write_text(OFFICIAL_YAML)
    model, info = load_model(path, yaml_path, vision_heads=2, text_heads=2)
    assert model.config == PHPConfig.tiny()
    assert info["epoch"] == 37 and info["scheduler_base_lrs"] == [3e-6, 6e-6] and info["has_optimizer"]
    assert info["yaml"]["img_size"] == (48, 24)
    if counters:
        assert info["counters"]["shared_transformer.resblocks.1.feed_forward.expert_count_accum"] == [5, 1, 0, 2]
    else:
        assert info["counters"] == {}
    apply_precision(source, "official")
    expected = source.state_dict()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key].to(value.dtype), value) for key, value in expected.items())
    assert {value.dtype for value in loaded.values()} == {torch.float32}


def test_own_checkpoint_round_trip_needs_no_overrides(tiny_model, tiny_images, tiny_token_ids, tmp_path):
    source = tiny_model(variant="crfm", coupling="per-sample", num_classes=4)
    path = tmp_path / "run" / "last.pth"
    save_atomic({"model": source.state_dict(), "config": config_to_dict(source.config), "epoch": 2}, path)
    model, info = load_model(path)
    assert model.config == source.config and info["epoch"] == 2
    images, ids = tiny_images(2), tiny_token_ids(2)
    with torch.no_grad():
        a, b = source.eval()(images, ids), model.eval()(images, ids)
    assert torch.equal(a.image_feats, b.image_feats) and torch.equal(a.text_logits, b.text_logits)
    assert load_model(path, variant="full")[0].config.variant == "full"


def test_strict_loader_names_missing_and_unexpected_keys(tiny_model):
    model = tiny_model()
    state = dict(model.state_dict())
    del state["safl.feed.1.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_checked(model, state, source="best.pth")
    message = str(error.value)
    assert _one_line(error) and "best.pth" in message
    assert "missing 1 keys (safl.feed.1.bias)" in message and "unexpected 1 keys (extra.weight)" in message


def test_strict_loader_reports_shape_mismatch(tiny_model):
    model = tiny_model()
    state = dict(model.state_dict())
    state["safl.part_tokens"] = torch.zeros(5, 32)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_checked(model, state)
    assert "safl.part_tokens (5, 32) vs (3, 32)" in str(error.value)


def test_suffix_matching_takes_the_longest_checkpoint_key(tiny_model):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    state = {key.removeprefix("base_model."): value for key, value in source.state_dict().items()}
    load_state_dict_checked(target, state)  # "visual.conv1.weight" is a suffix of "base_model.visual.conv1.weight"
    assert torch.equal(target.base_model.visual.conv1.weight, source.base_model.visual.conv1.weight)
    with_both = dict(source.state_dict())
    with_both["ln_final.weight"] = torch.zeros(32)  # shorter suffix: loses to the full key, so it is unused
    with pytest.raises(CheckpointError) as error:
        load_state_dict_checked(target, with_both)
    assert "unexpected 1 keys (ln_final.weight)" in str(error.value)


def test_save_atomic_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"a": torch.ones(2)}, path)
    save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    with pytest.raises(Exception):
        save_atomic({"a": lambda: None}, path)  # unpicklable: the old file must survive
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
