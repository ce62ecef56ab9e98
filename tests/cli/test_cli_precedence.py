"""Issue 22 items 1-4 through the real CLI: a user's values beat the preset, table cells count only
their recipe's runs, key=value overrides, and machine-readable output with nothing else on stdout."""

from __future__ import annotations

import csv
import io
import json
import tomllib

from php_runner.experiment.specs import expand, load_spec, shipped_folder
from php_runner.store.registry import Registry

METRIC_NAMES = ["R1", "R5", "R10", "mAP", "mINP"]
MY_LR = 'extends = "headline"\ndatasets = ["RSTPReid"]\n[train]\nlr = 1e-4\nepochs = 8\n'
MY_AUX = 'extends = "headline"\ndatasets = ["RSTPReid"]\n[loss]\naux_factor = 0.3\n'


def record_done_run(registry: Registry, planned, r1: float):
    metrics = dict(zip(METRIC_NAMES, [r1, 50.0, 60.0, 40.0, 30.0]))
    run = registry.plan_run(planned)
    registry.record_result(run.id, "best-on-test", 1, "test", metrics)
    registry.mark_done(run.id)
    return run


def headline_tiny_rstp(data_root):
    (planned,) = expand(load_spec(shipped_folder() / "headline.toml"), "tiny", ["RSTPReid"],
                        runtime={"data_root": str(data_root)})
    return planned


# ---- 1. explicit values win --------------------------------------------------------------------

def test_my_lr_keeps_its_lr_and_epochs_under_the_tiny_preset_and_says_so(cli, tmp_path, registry_url,
                                                                        tiny_data_root):
    (tmp_path / "my_lr.toml").write_text(MY_LR)
    code, out, err = cli("cat", "my_lr.toml", "--preset", "tiny")
    shown = tomllib.loads(out)
    assert code == 0 and shown["train"]["lr"] == 1e-4 and shown["train"]["epochs"] == 8
    assert shown["train"]["batch_size"] == 8 and shown["model"]["clip"] == "tiny"  # the preset still scales the rest
    assert "train.lr = 0.0001 kept; preset 'tiny' would set 0.0005" in err
    assert "train.epochs = 8 kept; preset 'tiny' would set 4" in err

    # A headline run under tiny is done: my_lr is another recipe, so it is queued, not "done before".
    registry = Registry(registry_url)
    record_done_run(registry, headline_tiny_rstp(tiny_data_root), 32.0)
    registry.close()
    code, out, err = cli("enqueue", "my_lr.toml", "--preset", "tiny", "--data-root", tiny_data_root,
                         "--db", registry_url)
    assert code == 0 and "1 queued or resumable, 0 done before" in out + err
    assert "train.lr = 0.0001 kept" in err
    code, out, _ = cli("status", "--json", "--db", registry_url)
    mine = [entry for entry in json.loads(out) if entry["spec"] == "my_lr"]
    assert len(mine) == 1 and mine[0]["status"] == "queued"
    code, out, _ = cli("show", str(mine[0]["id"]), "--json", "--db", registry_url)
    config = json.loads(out)["run"]["config"]
    assert config["train"]["lr"] == 1e-4 and config["train"]["epochs"] == 8 and config["train"]["batch_size"] == 8


def test_cat_explain_names_the_origin_of_each_value(cli, tmp_path):
    (tmp_path / "my_lr.toml").write_text(MY_LR)
    code, out, _ = cli("cat", "my_lr.toml", "--preset", "tiny", "--explain", "train.warmup_epochs=2")
    assert code == 0
    lines = {line.split(" = ")[0]: line for line in out.splitlines() if " = " in line}
    assert lines["lr"].endswith("# my_lr.toml") or "my_lr.toml" in lines["lr"].split("#")[1]
    assert lines["batch_size"].endswith("# preset tiny")
    assert lines["optimizer"].split("#")[1].strip().endswith("base.toml")
    assert lines["warmup_epochs"].endswith("# command line")
    assert tomllib.loads(out)["train"]["warmup_epochs"] == 2
    code, out, _ = cli("cat", "cnum", "--explain")
    assert '"model.cnum" = [3, 6, 9, 12]  # grid of' in out


# ---- 2. a cell counts only its recipe's runs ----------------------------------------------------

def _cell(views, row, dataset):
    (line,) = [line for line in views[0]["lines"] if line["row_key"] == row and line["dataset"] == dataset
               and line["kind"] == "trained"]
    return {cell["metric"]: cell for cell in line["metrics"]}


def test_my_aux_does_not_fill_the_headline_cell_and_gets_its_own_table(cli, tmp_path, registry_url, tiny_data_root):
    (tmp_path / "my_aux.toml").write_text(MY_AUX)
    registry = Registry(registry_url)
    record_done_run(registry, headline_tiny_rstp(tiny_data_root), 32.0)
    (aux,) = expand(load_spec(tmp_path / "my_aux.toml"), "tiny", runtime={"data_root": str(tiny_data_root)})
    record_done_run(registry, aux, 33.0)
    registry.close()

    code, out, err = cli("table", "headline", "--preset", "tiny", "--json", "--db", registry_url)
    assert code == 0
    cell = _cell(json.loads(out), "PHP", "RSTPReid")["R1"]
    assert cell["mean"] == 32.0 and cell["n"] == 1
    assert "1 recorded run(s) of this table's recipes" in err
    assert "1 run(s) of another recipe left out: my_aux (loss.aux_factor 0.3)" in err

    code, out, err = cli("table", "--spec", "my_aux.toml", "--preset", "tiny", "--json", "--db", registry_url)
    assert code == 0
    views = json.loads(out)
    assert _cell(views, "my_aux: PHP", "RSTPReid")["R1"]["mean"] == 33.0
    assert _cell(views, "PHP", "RSTPReid")["R1"]["mean"] == 32.0   # beside the paper's row


# ---- 3. overrides ---------------------------------------------------------------------------------

def test_overrides_sweep_validate_and_are_recorded(cli, tmp_path, registry_url, tiny_data_root):
    code, out, err = cli("enqueue", "headline", "train.lr=1e-5,3e-5", "--preset", "tiny", "--dataset", "RSTPReid",
                         "--data-root", tiny_data_root, "--db", registry_url)
    assert code == 0, err
    code, out, _ = cli("status", "--json", "--db", registry_url)
    entries = json.loads(out)
    assert len(entries) == 2
    details = [json.loads(cli("show", str(entry["id"]), "--json", "--db", registry_url)[1]) for entry in entries]
    assert sorted(d["run"]["config"]["train"]["lr"] for d in details) == [1e-5, 3e-5]
    assert {json.dumps(d["run"]["config"]["runtime"]["overrides"]) for d in details} == {
        '{"train.lr": 1e-05}', '{"train.lr": 3e-05}'}
    assert cli("show", str(entries[0]["id"]), "--db", registry_url)[1].count("overrides") >= 1

    code, out, err = cli("cat", "headline", "train.lr=1e-5")
    assert code == 0 and tomllib.loads(out)["train"]["lr"] == 1e-5
    code, out, err = cli("cat", "headline", "train.lrr=1e-5")
    assert code == 2 and "train.lrr" in err and "did you mean 'lr'?" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("run", "headline", "trian.lr=1e-5", "--preset", "tiny", "--db", registry_url)
    assert code == 2 and "did you mean 'train.lr'?" in err
    code, out, err = cli("enqueue", "headline", "train.lr=fast", "--preset", "tiny", "--db", registry_url)
    assert code == 2 and "command line: train.lr" in err
    (tmp_path / "typo.toml").write_text('extends = "headline"\n[loss]\naux_facter = 0.3\n')
    code, out, err = cli("cat", "typo.toml")
    assert code == 2 and "loss.aux_facter" in err and "did you mean 'aux_factor'?" in err


# ---- 4. machine-readable output ----------------------------------------------------------------

def test_formats_put_only_the_content_on_stdout(cli, registry_url, tiny_data_root):
    registry = Registry(registry_url)
    record_done_run(registry, headline_tiny_rstp(tiny_data_root), 32.0)
    registry.close()
    code, out, err = cli("table", "headline", "--preset", "tiny", "--format", "latex", "--db", registry_url)
    assert code == 0 and "written:" not in out and "written:" in err
    assert out.startswith("% php-run table headline") and out.rstrip().endswith("\\end{table*}")
    code, out, err = cli("table", "headline", "--preset", "tiny", "--format", "csv", "--db", registry_url)
    assert code == 0 and "written:" not in out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and all(row["table"] == "headline" for row in rows)
    code, out, err = cli("table", "headline", "--preset", "tiny", "--json", "--db", registry_url)
    assert code == 0 and json.loads(out)[0]["name"] == "headline" and "written:" in err


# ---- 7. small items ------------------------------------------------------------------------------

def test_status_filters_and_preset_column(cli, tmp_path, registry_url, tiny_data_root):
    (tmp_path / "my_aux.toml").write_text(MY_AUX)
    registry = Registry(registry_url)
    record_done_run(registry, headline_tiny_rstp(tiny_data_root), 32.0)
    (aux,) = expand(load_spec(tmp_path / "my_aux.toml"), "tiny", runtime={"data_root": str(tiny_data_root)})
    queued = registry.plan_run(aux)
    registry.close()
    ids = lambda *args: [e["id"] for e in json.loads(cli("status", "--json", "--db", registry_url, *args)[1])]
    assert ids("--spec", "my_aux") == [queued.id] == ids("--status", "queued")
    assert len(ids("--preset", "tiny", "--dataset", "RSTPReid")) == 2 and ids("--preset", "paper") == []
    code, out, _ = cli("status", "--db", registry_url)
    assert code == 0 and "preset" in out and "tiny" in out
    code, _, err = cli("status", "--status", "broken", "--db", registry_url)
    assert code == 2 and "--status" in err


def test_an_interrupted_run_is_resumable_and_not_failed(registry_url, tiny_data_root):
    registry = Registry(registry_url)
    run = registry.plan_run(headline_tiny_rstp(tiny_data_root))
    assert registry.claim_run(run.id, "host:1")
    assert registry.mark_interrupted(run.id, "host:1")
    again = registry.get_run(run.id)
    assert again.status == "interrupted" and registry.is_claimable(again)
    assert registry.claim_next("host:2").id == run.id


def test_version_and_help_without_type_placeholders(cli):
    import typer

    from php_runner.cli import app

    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("php-run ")

    def paths(group, prefix=()):
        for name, command in group.commands.items():
            yield from paths(command, prefix + (name,)) if hasattr(command, "commands") else [prefix + (name,)]

    for path in [(), *paths(typer.main.get_command(app))]:
        code, out, _ = cli(*path, "--help")
        assert code == 0 and "<bool>" not in out and "<str>" not in out and "<path>" not in out, path


def test_table_names_the_preset_that_has_results(cli, registry_url, tiny_data_root):
    registry = Registry(registry_url)
    record_done_run(registry, headline_tiny_rstp(tiny_data_root), 32.0)
    registry.close()
    code, out, err = cli("table", "--all", "--db", registry_url)
    assert code == 0 and "No results under --preset paper; recorded results are under --preset tiny (1 run(s))" in err
    code, out, err = cli("table", "headline", "--format", "latex", "--db", registry_url)
    assert code == 0 and "--preset tiny" in err and "No results" not in out


def test_synthetic_data_is_announced_and_the_data_root_recorded_absolute(cli, tmp_path, registry_url):
    code, _out, err = cli("enqueue", "headline", "--preset", "tiny", "--dataset", "RSTPReid", "--data-root", "mine",
                         "--db", registry_url)
    assert code == 0, err
    assert f"writing synthetic RSTPReid (random images and captions) under {tmp_path / 'mine'}" in err
    (entry,) = json.loads(cli("status", "--json", "--db", registry_url)[1])
    config = json.loads(cli("show", str(entry["id"]), "--json", "--db", registry_url)[1])["run"]["config"]
    assert config["runtime"]["data_root"] == str(tmp_path / "mine")
