"""The README's results and benchmark tables are what `make readme` renders from the
committed numbers in docs/results/tiny.json (``latentlib.readme``), and the command turns
a run's files into those numbers."""

import json
from pathlib import Path

import pytest

from latentlib import readme

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "results" / "tiny.json"


def test_the_readme_tables_are_what_the_committed_numbers_render():
    text = (ROOT / "README.md").read_text()
    found = readme.sections(text)
    assert set(readme.SECTIONS) <= set(found), f"README.md lacks the markers of {set(readme.SECTIONS) - set(found)}"
    rendered = {}
    for path in sorted(DATA.parent.glob("*.json")):  # the main run's file and every other run's
        expected = readme.render(json.loads(path.read_text()))
        assert expected, f"{path.name} renders nothing"
        for name, body in expected.items():
            assert found.get(name) == body, (
                f"README.md's {name} section differs from what docs/results/{path.name} renders: the README was "
                "edited by hand, or the numbers were not collected; run `make readme` (after a run) or "
                f"`python -m latentlib.readme --render --run {path.stem}`")
        rendered.update(expected)
        assert readme.update_readme(text, expected) == text
    assert set(found) == set(rendered), f"README.md sections no committed file renders: {set(found) - set(rendered)}"


def test_every_row_of_the_committed_main_table_is_in_the_readme():
    data = json.loads(DATA.read_text())
    section = readme.sections((ROOT / "README.md").read_text())["results"]
    for row in data["results"]["main"]:
        assert f"| {row['method']} |" in section


def _fake_run(root: Path, run: str) -> None:
    """A project directory with what a pipeline run and `make bench` leave behind."""
    tables = root / "reports" / run / "tables"
    tables.mkdir(parents=True)
    (tables / "main.csv").write_text(
        "method,evaluated_in,accuracy,accuracy_flexible,visible_tokens,latent_steps,ms_per_problem,n\n"
        "CoT,00_teacher_extraction,1.0,1.0,8.0,0.0,1.5,50\n"
        "Coconut (plain format),02_curriculum,0.964,0.97,2.0,6.0,2.5,50\n"
        "SWITCH phase 3 | GRPO,03_grpo,0.9861,0.99,6.72,2.661,3.1,50\n")
    (tables / "probes_summary.csv").write_text("measurement,model,value\n<swi> median rank where written,SWITCH,1.0\n"
                                               "\"accuracy change, zero\",SWITCH,-0.878\n")
    (root / "reports" / run / "pipeline.json").write_text(json.dumps(
        {"total_seconds": 100.4, "stages": [{"stage": "00_teacher_extraction", "status": "ok", "seconds": 60.2},
                                            {"stage": "04_evaluation", "status": "ok", "seconds": 40.1}]}))
    (tables / "table1_tasks.csv").write_text(
        "method,chain accuracy,chain visible tokens,graph accuracy,graph visible tokens\n"
        "CoT,1.0,8.0,0.71,9.5\nCoconut,0.96,2.0,0.93,2.0\n")
    (root / "reports" / run / "pipeline_runs.json").write_text(json.dumps(
        {"runs": {run: 100.4, f"{run}-graph": 50.2}, "total_seconds": 150.6}))
    (root / "reports" / run / "run_info.json").write_text(json.dumps(
        {"written_at": "2026-12-01T10:00:00", "commit": "abc123", "threads": 2, "cpu_count": 2}))
    res = root / "benchmarks" / "results"
    res.mkdir(parents=True)
    machine = {"threads": 2, "cpu_count": 2, "torch": "2.13.0+cpu"}
    (res / "engine_decode.json").write_text(json.dumps({"machine": machine, "written_at": "2026-12-01T11:00:00",
        "rows": [{"model": m, "batch": b, "latent_ratio": 0.97, "mixed_ratio": 0.96} for m in ("tiny", "smollm2-135m")
                 for b in (1, 8, 32)]}))
    (res / "coconut_reference.json").write_text(json.dumps({"machine": machine, "written_at": "2026-12-01T11:10:00",
        "evaluation": {"problems": 500, "speedup": 30.44, "identical_answers": 500},
        "training": [{"batch": 32, "loss_abs_diff": 0.0, "engine_over_reference": 0.42},
                     {"batch": 128, "loss_abs_diff": 0.0, "engine_over_reference": 0.17}]}))
    (res / "trl_comparison.json").write_text(json.dumps({"machine": machine, "written_at": "2026-12-01T12:00:00",
        "grpo": [{"model": "tiny", "ours_vs_trl": {"median": 0.86}, "blocks_vs_text": {"median": 2.17},
                  "loss_parity": {"bnpo": {"rel_diff": 1.5e-07, "abs_diff": 8e-09, "within_tolerance": True},
                                  "grpo": {"rel_diff": 1.6e-06, "abs_diff": 9e-09, "within_tolerance": True}},
                  "last": {"ours_blocks": {"latent_steps": 8.27}}}],
        "sft": [{"model": "tiny", "phase": "SWITCH phase 1", "ours_vs_trl": {"median": 0.79},
                 "loss_parity": {"rel_diff": 2e-3, "abs_diff": 7e-3, "within_tolerance": False}},
                {"model": "smollm2-135m", "phase": "Coconut stage 0", "skipped": "TRL: no attribute 'bias'"}]}))
    mb = 2 ** 20
    (res / "distributed.json").write_text(json.dumps({"machine": machine, "written_at": "2026-12-01T13:00:00",
        "scaling": {"configs": {
            "1 process x 1 thread": {"parallel": "single", "processes": 1, "parameter_bytes_per_process": [400 * mb]},
            "2 processes x 1 thread, DDP": {"parallel": "ddp", "processes": 2, "speedup_vs_1x1": 1.6,
                                            "efficiency_vs_1x1": 0.8, "parameter_bytes_per_process": [400 * mb] * 2},
            "2 processes x 1 thread, FSDP2": {"parallel": "fsdp", "processes": 2, "speedup_vs_1x1": 0.75,
                                              "efficiency_vs_1x1": 0.375,
                                              "parameter_bytes_per_process": [200 * mb] * 2}}},
        "checkpoint": {"rows": [{"run": "Coconut LoRA", "checkpoint_vs_full": 0.083},
                                {"run": "SWITCH LoRA", "checkpoint_vs_full": 0.343}]},
        "grpo_memory": {"adapter-disabled": {"peak_rss_bytes": 2000 * mb}, "copy": {"peak_rss_bytes": 2500 * mb}}}))
    (root / "README.md").write_text("# x\n\n<!-- readme:results -->\nold\n<!-- /readme:results -->\n\ntext\n\n"
                                    "<!-- readme:table1 -->\n<!-- /readme:table1 -->\n\n"
                                    "<!-- readme:benchmarks -->\n<!-- /readme:benchmarks -->\n")


def test_the_command_collects_a_run_writes_the_numbers_and_checks_the_readme(tmp_path, capsys):
    _fake_run(tmp_path, "tiny")
    assert readme.main(["--run", "tiny", "--project", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "docs" / "results" / "tiny.json").read_text())
    assert data["results"]["commit"] == "abc123" and data["results"]["threads"] == 2
    assert [r["method"] for r in data["results"]["main"]][2] == "SWITCH phase 3 | GRPO"
    assert data["results"]["main"][1]["accuracy"] == 0.964 and data["results"]["total_seconds"] == 100
    text = (tmp_path / "README.md").read_text()
    assert "| Coconut (plain format) | 02 | 96.4% | 2 | 6 |" in text
    assert "| SWITCH phase 3 \\| GRPO | 03 | 98.6% | 6.72 | 2.66 |" in text
    assert "commit `abc123`, 2 threads on a 2-core machine" in text and "00 60 s, 04 40 s" in text
    assert "| accuracy change, zero | SWITCH | -0.878 |" in text
    assert "| K=6 latent steps + T text tokens vs `model.generate`, batch 1 / 8 / 32 | >= 0.9 | 0.97 / 0.97 / 0.97 |" in text
    assert "30.4x, identical answers 500/500" in text and "loss diff 0, 0.42x / 0.17x the time" in text
    assert "| Coconut | 96.0% | 2 | 93.0% | 2 |" in text  # Table 1 across the tasks
    assert "`tiny` 100 s, `tiny-graph` 50 s; in all 150 s, 1.50x the main run alone" in text
    assert ("| Switch-GRPO step (text only) vs TRL `GRPOTrainer` step | <= 1.0x; same loss | 0.86x, loss diff 9e-09 "
            "(rel. 2e-06, within tolerance) |") in text
    assert ("| SFT step (SWITCH phase 1) vs TRL `SFTTrainer` step | <= 1.0x; same loss | 0.79x, loss diff 7e-03 "
            "(rel. 2e-03, outside tolerance) |") in text
    assert "| SFT step (Coconut stage 0) vs TRL `SFTTrainer` step | <= 1.0x; same loss |  | not comparable: no attribute 'bias' |" in text
    assert ("| 2 processes x 1 thread vs 1 process x 1 thread, a Coconut stage step (CPU, gloo): speed-up DDP / FSDP2; "
            "FSDP2 parameter bytes per process |  |  | 1.60x (efficiency 0.80) / 0.75x; 0.50x |") in text
    assert "| LoRA checkpoint bytes vs the full state, Coconut / SWITCH |  |  | 0.08x / 0.34x |" in text
    assert "| 2000 vs 2500 MB (0.80x) |" in text
    assert text.startswith("# x\n") and "\ntext\n" in text
    assert readme.main(["--check", "--run", "tiny", "--project", str(tmp_path)]) == 0
    (tmp_path / "README.md").write_text(text.replace("96.4%", "97.0%"))
    assert readme.main(["--check", "--run", "tiny", "--project", str(tmp_path)]) == 1
    assert "differs" in capsys.readouterr().err


def test_another_run_fills_its_own_section_beside_the_main_one(tmp_path, capsys):
    _fake_run(tmp_path, "tiny")
    assert readme.main(["--run", "tiny", "--project", str(tmp_path)]) == 0
    _fake_run_results(tmp_path, "smollm2-135m", accuracy=0.25)
    assert readme.main(["--run", "smollm2-135m", "--project", str(tmp_path)]) == 2  # no markers for it yet
    assert "readme:results-smollm2-135m" in capsys.readouterr().err
    readme_file = tmp_path / "README.md"
    readme_file.write_text(readme_file.read_text() + "\n<!-- readme:results-smollm2-135m -->\n"
                                                     "<!-- /readme:results-smollm2-135m -->\n")
    before = readme.sections(readme_file.read_text())
    assert readme.main(["--run", "smollm2-135m", "--project", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "docs" / "results" / "smollm2-135m.json").read_text())
    assert "benchmarks" not in data  # the benchmark table is the main run's
    after = readme.sections(readme_file.read_text())
    assert {k: v for k, v in after.items() if k != "results-smollm2-135m"} == {
        k: v for k, v in before.items() if k != "results-smollm2-135m"}  # the main run's sections untouched
    assert "run `smollm2-135m`" in after["results-smollm2-135m"]
    assert "| CoT | 00 | 25.0% | 8 | 0 |" in after["results-smollm2-135m"]
    assert "| CoT | 00 | 100.0% | 8 | 0 |" in after["results"]
    for run in ("tiny", "smollm2-135m"):
        assert readme.main(["--check", "--run", run, "--project", str(tmp_path)]) == 0


def _fake_run_results(root: Path, run: str, accuracy: float) -> None:
    tables = root / "reports" / run / "tables"
    tables.mkdir(parents=True)
    (tables / "main.csv").write_text("method,evaluated_in,accuracy,visible_tokens,latent_steps,n\n"
                                     f"CoT,00_teacher_extraction,{accuracy},8.0,0.0,100\n")
    (root / "reports" / run / "pipeline.json").write_text(json.dumps(
        {"total_seconds": 400.0, "stages": [{"stage": "00_teacher_extraction", "status": "ok", "seconds": 400.0}]}))


def test_a_part_without_new_files_keeps_the_committed_numbers(tmp_path):
    _fake_run(tmp_path, "tiny")
    for p in (tmp_path / "benchmarks" / "results").iterdir():
        p.unlink()
    previous = {"benchmarks": {"date": "2026-11-22", "rows": [{"measurement": "m", "target": "t", "tiny": "1",
                                                              "smollm2-135m": ""}]}}
    data = readme.collect(tmp_path, "tiny", previous)
    assert data["benchmarks"] == previous["benchmarks"] and data["results"]["commit"] == "abc123"


def test_the_readme_markers_must_exist():
    with pytest.raises(ValueError, match="markers"):
        readme.update_readme("# no markers\n", {"results": "x"})


def test_rows_of_benchmarks_not_re_run_are_kept_with_the_date_they_were_measured(tmp_path):
    _fake_run(tmp_path, "tiny")
    (tmp_path / "benchmarks" / "results" / "engine_decode.json").unlink()
    previous = {"benchmarks": {"date": "2026-11-22", "rows": [
        {"measurement": "m (an older benchmark)", "target": "t", "tiny": "1", "smollm2-135m": ""}]}}
    data = readme.collect(tmp_path, "tiny", previous)
    rows = {r["measurement"]: r for r in data["benchmarks"]["rows"]}
    assert rows["m (an older benchmark)"]["date"] == "2026-11-22"
    assert all(r["date"] == "2026-12-01" for m, r in rows.items() if m != "m (an older benchmark)")
    assert not any(r["measurement"].startswith("K=6") for r in data["benchmarks"]["rows"])  # nothing invented
    text = readme.render(data)["benchmarks"]
    assert "| measured |" in text and "| m (an older benchmark) | t | 1 |  | 2026-11-22 |" in text
    assert "| 2026-12-01, 2 threads |" in text  # the rows collected now: their file's date and threads
