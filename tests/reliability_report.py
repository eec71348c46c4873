"""docs/reliability.md from a run of the reliability tests (``make reliability-report``).

Runs the fault-injection tests (tests/test_faults.py, the Slurm node-death test) and the older refusal, resume
and stop-signal tests with pytest, reads their outcomes from pytest's JUnit XML, and writes one table: the
fault, how it is injected, what the test checks, and the outcome of this run. The tests of test_faults.py say
what their rows are (``record_property("reliability", ...)``); the older tests' rows are listed below. A test
that is missing (renamed, deselected) shows as such: nothing in the table is written by hand but these texts.

    python tests/reliability_report.py [--out docs/reliability.md] [pytest args, e.g. -m "not slurm"]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW = [  # rows recorded by the tests themselves
    "tests/test_faults.py::test_zero2_assemble_killed_rank_killed_saves_resume_bit_exact",
    "tests/test_faults.py::test_farmed_incubation_group_killed_resumes_bit_exact",
    "tests/test_faults.py::test_disk_full_names_path_and_bytes_then_resumes",
    "tests/test_faults.py::test_nonfinite_loss_stops_the_phase_at_that_step",
    "tests/test_faults.py::test_nonfinite_gradients_stop_or_are_skipped_within_the_limit",
    "tests/test_faults.py::test_planted_pickle_is_refused_and_never_runs",
    "tests/test_faults.py::test_every_load_in_the_library_is_weights_only_or_safetensors",
    "tests/test_faults.py::test_no_secret_leaves_the_process",
    "tests/test_slurm.py::test_node_death_requeue_resumes_from_the_newest_complete_checkpoint",
]
OLD = {  # nodeid: (fault, how it is injected, what the test checks)
    "tests/test_faults.py::test_every_load_in_the_library_is_weights_only_or_safetensors": (
        "code run from an untrusted file (audit)", "static scan of modasm/ and launch/",
        "no pickle.load/loads/Unpickler; every torch.load has weights_only=True"),
    "tests/test_pipeline.py::test_killed_phase_resumes_to_the_same_weights": (
        "a lone process SIGKILLed between checkpoints", "SIGKILL from the test after the first COMPLETE marker",
        "re-run resumes from the newest complete checkpoint; shards equal an uninterrupted run's bit for bit"),
    "tests/test_resume.py::test_stop_then_resume_and_changed_settings_are_refused": (
        "a stop request, then re-runs with other settings", "the stop file (what the Slurm scripts touch); changed "
        "lr, epochs, width", "checkpoint at the next step; a checkpoint or shard set of other settings refused, "
        "naming the key; the resume equals an uninterrupted run"),
    "tests/test_resume.py::test_an_epoch_with_fewer_batches_than_planned_is_an_error": (
        "training data shrinks under a running phase", "a loader cut to 3 of 4 micro-batches",
        "UserError naming the epoch and the counts; the epoch is never re-entered"),
    "tests/test_multiproc.py::test_stop_signal_to_one_rank_checkpoints_all_and_resumes": (
        "a stop signal reaching one rank of two", "SIGUSR1 to rank 1 under torchrun",
        "all ranks save one complete checkpoint together and exit 0; the re-run ends with an uninterrupted run's "
        "weights"),
    "tests/test_cluster.py::test_a_module_stopped_on_two_ranks_resumes_on_one": (
        "a requeued job gets another rank count", "stop file on a 2-rank ZeRO-2 incubation, resume on 1 rank",
        "universal checkpoint conversion; ends within 1e-5 of an uninterrupted 2-rank run"),
    "tests/test_cluster.py::test_a_node_that_finishes_first_does_not_stop_the_other": (
        "one node's torchrun leaves a farm early", "two torchrun agents as two nodes, node 0 has no work",
        "node 1's group trains and exports both its modules after node 0 left"),
    "tests/test_cluster.py::test_one_world_over_two_nodes_with_two_groups_is_refused": (
        "a farm layout that would die with its first node", "one torchrun world over 2 nodes, 2 groups",
        "refused before training, naming the fix"),
    "tests/test_farm.py::test_group_finishes_while_the_other_is_frozen": (
        "one module group frozen", "SIGSTOP of group 2's ranks after the split",
        "group 1 trains, checkpoints, evaluates and exports both its modules"),
    "tests/test_slurm.py::test_usr1_checkpoints_requeues_and_resumes": (
        "the job's time limit", "scancel --signal=USR1 --batch (sbatch --signal=B:USR1)",
        "checkpoint, requeue, resume at the saved step, finish"),
    "tests/test_slurm.py::test_sigterm_checkpoints_requeues_and_resumes_to_the_same_weights": (
        "preemption", "SIGTERM to the job's steps (scancel --signal=TERM)",
        "save at the next step, requeue, resume; weights equal an uninterrupted run's"),
    "tests/test_slurm.py::test_scancel_cancels_the_job_instead_of_requeueing_it": (
        "a user cancels a running job", "scancel JOB (SIGTERM to every step and to the batch shell)",
        "the job ends CANCELLED, not requeued"),
    "tests/test_slurm.py::test_a_failing_module_of_a_farm_fails_the_job_instead_of_requeueing_it": (
        "one module of a one-node farm fails for good", "non-finite loss at module 0's first step "
        "(MODASM_FAULT_NONFINITE); torchrun stops the other group with SIGTERM",
        "the job ends FAILED, not requeued; the error is the last line of its log"),
    "tests/test_slurm.py::test_a_rank_that_never_stops_is_killed_and_the_job_requeues": (
        "a rank hangs as the time limit nears", "MODASM_FAULT_HANG_AT_STEP, then USR1 to the batch shell",
        "steps killed after MODASM_STOP_TIMEOUT, requeue, resume from the newest complete checkpoint, finish"),
    "tests/test_slurm.py::test_failed_array_task_keeps_assemble_from_running": (
        "one array task fails", "a stale checkpoint of other settings in module 1's directory",
        "task 1 FAILED naming the setting; assemble and report never run; the check job says what to re-run"),
    "tests/test_interop.py::test_a_file_that_needs_code_to_unpickle_is_refused_and_never_runs": (
        "an imported checkpoint that needs code to unpickle", "a .pth whose unpickling would create a file",
        "refused naming the file and the global; the payload never ran"),
    "tests/test_data_imagenet.py::test_bad_samples_are_skipped_counted_and_stop_the_phase": (
        "unreadable training samples", "truncated JPEGs in the image tree",
        "skipped and counted; past data.max_bad_fraction the phase stops naming the file"),
}
SHARDS = {  # tests/test_shards.py: every refusal of a bad hand-off, before anything trains
    "test_flipped_byte_is_refused": ("a flipped byte in a shard file", "one byte of module-01.safetensors XOR 1",
                                     "refused naming the file and its sha256"),
    "test_missing_module_is_refused": ("a module not incubated", "module-01 removed",
                                       "refused naming the module and the commands that finish it"),
    "test_missing_manifest_is_not_a_checkpoint": ("an export killed before its manifest", "manifest.json removed",
                                                  "not taken as a shard set"),
    "test_shard_of_another_split_is_refused": ("a shard of another split", "module copied from a [2, 1] run",
                                               "refused naming both splits"),
    "test_shard_of_another_width_is_refused": ("a shard of another width", "module copied from a 48-wide run",
                                               "refused naming model.embed_dim"),
    "test_another_modules_shard_in_the_slot_is_refused": ("module 0's shard in module 1's slot", "directory copied",
                                                          "refused: module 1 missing, the set holds [0]"),
    "test_meta_shard_in_an_incubate_slot_is_refused": ("a meta shard set in an incubation slot", "directory copied",
                                                       "refused naming phase 'meta' vs 'incubate'"),
    "test_missing_file_under_a_manifest_is_refused": ("a module file deleted under its manifest", "file removed",
                                                      "refused naming the file"),
    "test_truncated_manifest_is_refused": ("a truncated manifest", "manifest cut in half", "refused: not valid JSON"),
    "test_manifest_tensor_list_checked_against_the_file": ("an edited manifest", "a tensor shape changed, digest "
                                                           "redone", "refused by its own digest, then against the file"),
    "test_flipped_byte_in_a_manifest_key_is_refused": ("a flipped bit in a manifest key", "'split' -> 'rplit'",
                                                       "refused naming the manifest, never a KeyError"),
    "test_every_flipped_manifest_byte_is_refused": ("any flipped manifest bit", "every third byte XOR 1",
                                                    "no flip that changes the content is accepted"),
    "test_meta_shard_refused_before_incubation": ("a truncated meta shard", "last 10 bytes cut",
                                                  "incubation refused before any checkpoint"),
    "test_cli_refuses_with_a_clear_error": ("a corrupt shard via the command line", "a byte of module-01 flipped",
                                            "exit 2, one line naming the file, no traceback"),
    "test_manifest_is_written_last_and_a_rewrite_is_never_half_complete": (
        "a writer killed between modules", "save_file raising on module 1",
        "manifest written last; a half-rewritten set has none"),
}
OLD.update({f"tests/test_shards.py::{name}": row for name, row in SHARDS.items()})
TESTS = list(dict.fromkeys(NEW + list(OLD)))


def nodeid(case: ET.Element) -> str:
    module = case.get("classname", "")
    parts = module.split(".")
    # pytest names the class path tests.test_x(.Class); the file is tests/test_x.py
    for i in range(len(parts), 0, -1):
        path = ROOT / Path(*parts[:i]).with_suffix(".py")
        if path.is_file():
            return "::".join([Path(*parts[:i]).with_suffix(".py").as_posix(), *parts[i:], case.get("name").split("[")[0]])
    return f"{module}::{case.get('name')}"


def outcomes(xml: Path) -> dict[str, dict]:
    """nodeid (parameters folded) -> outcome, seconds, recorded rows."""
    out: dict[str, dict] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        nid = nodeid(case)
        got = out.setdefault(nid, {"outcome": "passed", "seconds": 0.0, "rows": [], "message": ""})
        got["seconds"] += float(case.get("time", 0))
        for tag, word in (("skipped", "skipped"), ("error", "error"), ("failure", "failed")):
            child = case.find(tag)
            if child is not None and got["outcome"] != "failed":
                got["outcome"] = word
                got["message"] = (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
        for prop in case.iter("property"):
            if prop.get("name") == "reliability":
                row = json.loads(prop.get("value"))
                if row not in got["rows"]:
                    got["rows"].append(row)
    return out


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write(results: dict[str, dict], out: Path, summary: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [
        "# Reliability: faults injected, and what holds",
        "",
        f"Generated by `make reliability-report` (`tests/reliability_report.py`) from a run of the tests below on "
        f"{datetime.date.today().isoformat()} (commit {commit.strip() or '?'}, {platform.machine()}, "
        f"{platform.python_version()}): {summary}. Do not edit by hand: re-run it.",
        "",
        "Faults are real: processes SIGKILLed (the hooks of `modasm/faults.py`, inert unless a `MODASM_FAULT_*` "
        "variable is set, kill the process itself at an exact step or after an exact number of checkpoint or shard "
        "files; Slurm's `scancel`), a tmpfs that fills up, files planted on disk, secrets in the environment, real "
        "torchrun / DeepSpeed / gloo / Slurm / W&B (no mocks). How each mechanism works: "
        "[docs/method.md](method.md#faults-and-what-holds-issue-14).",
        "",
        "| fault | how it is injected | what the test checks | test | outcome |",
        "|---|---|---|---|---|",
    ]
    for nid in TESTS:
        got = results.get(nid)
        rows = (got or {}).get("rows") or ([dict(zip(("fault", "injected", "checks"), OLD[nid]))] if nid in OLD else
                                           [{"fault": nid.split("::")[-1], "injected": "?", "checks": "?"}])
        if got is None:
            outcome = "**not run** (not collected)"
        elif got["outcome"] == "passed":
            outcome = f"passed ({got['seconds']:.0f} s)"
        else:
            outcome = f"**{got['outcome']}** ({got['seconds']:.0f} s){': ' + got['message'] if got['message'] else ''}"
        short = nid.replace("tests/", "")
        for row in rows:
            lines.append(f"| {cell(row['fault'])} | {cell(row['injected'])} | {cell(row['checks'])} | `{short}` | "
                         f"{cell(outcome)} |")
    out.write_text("\n".join(lines) + "\n")


def collected() -> list[str]:
    """The node ids pytest finds in the files of TESTS (a test renamed or removed since is reported, not an error)."""
    files = sorted({t.split("::")[0] for t in TESTS})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args, pytest_args = p.parse_known_args(argv)
    present = collected()
    run = [t for t in TESTS if any(c == t or c.startswith(t + "[") for c in present)]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                              "-o", "junit_family=xunit1", *pytest_args, *run], cwd=ROOT)
        if not xml.is_file():
            print("reliability-report: pytest wrote no results", file=sys.stderr)
            return res.returncode or 1
        results = outcomes(xml)
    passed = sum(r["outcome"] == "passed" for r in results.values())
    summary = f"{passed} of {len(TESTS)} tests passed" + ("" if len(results) == len(TESTS) else
                                                          f", {len(TESTS) - len(results)} not run")
    write(results, Path(args.out), summary)
    print(f"reliability-report: {summary}; wrote {args.out}")
    return res.returncode


if __name__ == "__main__":
    raise SystemExit(main())
