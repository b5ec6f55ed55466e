"""The GPU suite's dry run (benchmarks/gpu/run.sh --dry-run) and the plots, on the CPU:
what can rot between GPU loans is exercised in every CI run."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")
RECORDED = os.path.join(ROOT, "benchmarks", "results", "cpu")
FAMILIES = ["scan", "linear_attention", "sparse_softmax", "global_pointer"]
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))
import suite  # noqa: E402


def make_wheel(folder, dist, version, module):
    """A minimal pure-Python wheel that installs `module` with one constant."""
    info = f"{dist}-{version}.dist-info"
    path = os.path.join(folder, f"{dist}-{version}-py3-none-any.whl")
    files = {
        f"{module}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def run_suite(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.run(["bash", RUN, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    wheels = tmp / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "seqfuse_suite_dummy", "0.1", "seqfuse_suite_dummy")
    # A distribution this python already has: the suite must leave it alone.
    make_wheel(wheels, "numpy", "0.0.1", "numpy")
    out = tmp / "out"
    proc = run_suite(str(out), "--wheels", str(wheels), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield out, proc.stdout
    prefix = out / "anchors_prefix.txt"  # the suite's temporary install folder
    if prefix.exists():
        shutil.rmtree(prefix.read_text().strip(), ignore_errors=True)


def test_dry_run_layout(dry_run):
    out, _ = dry_run
    for name in ["env.json", "steps.tsv", "ceilings.json", "results.json", "results.md"]:
        assert (out / name).is_file(), name
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] is True and env["torch"] and env["commit"]
    steps = {s["step"]: s for s in suite.read_steps(str(out / "steps.tsv"))}
    expected = ["env", "anchors", "build", "probe", "tests", "sanitize-cpu", "ceilings",
                *(f"bench-{f}" for f in FAMILIES)]
    assert list(steps) == expected
    for name in ["env", "anchors", "sanitize-cpu", "ceilings"]:
        assert steps[name]["status"] == "ok", (name, (out / steps[name]["log"]).read_text())
    assert steps["build"]["status"] == steps["tests"]["status"] == "skipped"
    assert steps["probe"]["status"] == "skipped"
    assert "TORCH_CUDA_ARCH_LIST=" in (out / "logs" / "build.log").read_text()
    assert "-m cuda tests" in (out / "logs" / "tests.log").read_text()
    for s in steps.values():
        assert (out / s["log"]).is_file()
    assert sorted(os.listdir(out / "bench")) == sorted(f"{f}.json" for f in FAMILIES)
    ceilings = json.loads((out / "ceilings.json").read_text())
    assert ceilings["copy_GB/s"] > 0 and set(ceilings["matmul_TFLOP/s"]) == {
        "bfloat16", "float16", "float32"}


def test_dry_run_installs_only_missing_wheels(dry_run):
    out, _ = dry_run
    prefix = (out / "anchors_prefix.txt").read_text().strip()
    assert os.path.isfile(os.path.join(prefix, "seqfuse_suite_dummy", "__init__.py"))
    assert not os.path.exists(os.path.join(prefix, "numpy"))
    log = (out / "logs" / "anchors.log").read_text()
    assert "installed: seqfuse_suite_dummy-0.1-py3-none-any.whl" in log
    assert "present: numpy" in log


def test_dry_run_sanitizer_workload_ran(dry_run):
    out, _ = dry_run
    log = (out / "logs" / "sanitize-cpu.log").read_text()
    assert "sanitize.py: 0 failed" in log
    for name in ["linear_scan", "causal_linear_attention", "sparse_softmax", "global_pointer"]:
        assert f"float64   {name}" in log or f"float32   {name}" in log


def test_dry_run_summary_from_recorded_cpu_run(dry_run):
    out, stdout = dry_run
    report = json.loads((out / "results.json").read_text())
    assert [f["family"] for f in report["summary"]] == sorted(FAMILIES)
    # The % of ceiling is the recorded rate over the suite's measured copy bandwidth.
    recorded = json.load(open(os.path.join(RECORDED, "scan.json")))
    first = recorded["rows"][0]
    row = report["families"]["scan"]["rows"][0]
    assert row["%copy"] == pytest.approx(100 * first["GB/s"] / report["ceilings"]["copy_GB/s"])
    md = (out / "results.md").read_text()
    assert "Dry run" in md and all(f"## {f}" in md for f in FAMILIES)
    # The summary table comes last: one line per family after its header.
    tail = stdout.strip().splitlines()[-len(FAMILIES) - 1:]
    assert tail[0].startswith("family")
    assert [line.split()[0] for line in tail[1:]] == sorted(FAMILIES)


@pytest.mark.parametrize("args", [[], ["--bogus", "x"], ["a", "b"], ["x", "--wheels"],
                                  ["x", "--wheels", "/nonexistent/wheels"]])
def test_bad_arguments(args, tmp_path):
    proc = run_suite(*args, timeout=30)
    assert proc.returncode == 2
    assert "run.sh" in proc.stderr or "usage" in proc.stderr.lower()


def test_report_takes_the_rows_of_a_benchmark_cut_short(tmp_path):
    # A family stopped by its time limit writes no JSON; the rows it printed count.
    (tmp_path / "logs").mkdir()
    (tmp_path / "bench").mkdir()
    row = {"shape": "8x4096x1536", "dtype": "float32", "GB/s": 1000.0}
    (tmp_path / "logs" / "bench-scan.log").write_text(
        "device: x\nrow: " + json.dumps(row) + "\nrow: {\"shape\": \"8x")  # killed mid-line
    (tmp_path / "ceilings.json").write_text(json.dumps({"copy_GB/s": 4000.0}))
    report = suite.build_report(str(tmp_path))
    scan = report["families"]["scan"]
    assert scan["partial"] is True and len(scan["rows"]) == 1
    assert scan["rows"][0]["%copy"] == pytest.approx(25.0)


def test_bench_rows_are_printed_as_they_are_measured(capsys):
    from seqfuse.bench.common import Rows

    rows = Rows()
    rows.append({"a": 1})
    rows += [{"a": 2}, {"a": 3}]
    printed = [json.loads(line[len("row: "):]) for line in capsys.readouterr().out.splitlines()]
    assert printed == list(rows) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_probe_records_the_toolchain_and_runs_the_cpu_probe(tmp_path):
    # Here (no GPU) the CUDA probes fail; the CPU one must pass, in its own process.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "suite.py"),
                           "probe", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["probes"]["cpu error with a number"]["rc"] == 0, record
    assert record["loaded libstdc++"] and record["ldd (libstdc++, libgcc, libgomp)"]
    import torch
    assert proc.returncode == (0 if torch.cuda.is_available() else 1), proc.stdout


def test_annotate_rates():
    ceilings = {"copy_GB/s": 200.0, "matmul_TFLOP/s": {"bfloat16": 500.0}}
    row = suite.annotate({"dtype": "bfloat16", "GB/s": 50.0, "GFLOP/s": 25_000.0}, ceilings)
    assert row["%copy"] == pytest.approx(25.0) and row["%matmul"] == pytest.approx(5.0)
    row = suite.annotate({"dtype": "float64", "TFLOP/s": 1.0, "%matmul": 3.0}, ceilings)
    assert "%matmul" not in row and "%copy" not in row
    assert row["%matmul (own run)"] == 3.0  # the benchmark's own figure, kept apart


def test_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    from seqfuse.bench import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert plot.main([os.path.join(RECORDED, "scan.json"), "--out", str(tmp_path)]) == 1
    assert "pip install seqfuse[plot]" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_plot_recorded_cpu_results(tmp_path):
    pytest.importorskip("matplotlib")
    from seqfuse.bench import plot

    # One line chart and the bar chart: the other two families take the line path too.
    charts = ["scan", "global_pointer"]
    paths = [os.path.join(RECORDED, f"{f}.json") for f in charts]
    assert plot.main([*paths, "--out", str(tmp_path)]) == 0
    for family in charts:
        with open(tmp_path / f"{family}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tests_only_stops_after_the_tests(tmp_path):
    # --tests-only: the machine record, the build, the probe and the CUDA tests, then the
    # report; no sanitizer, ceilings or benchmark step.
    proc = run_suite(str(tmp_path / "out"), "--dry-run", "--tests-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line.split("\t")[0] for line in
             (tmp_path / "out" / "steps.tsv").read_text().splitlines()]
    assert steps[-1] == "tests" and "env" in steps and "build" in steps
    assert not any(s.startswith(("bench", "sanitize", "memcheck", "ceilings")) for s in steps)
    assert (tmp_path / "out" / "results.md").exists()
