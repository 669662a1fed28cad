"""Collect the parts of scripts/gpu_check.sh into one JSON: the machine (device,
versions, commit), the command and date, each part's outcome and the overall pass.
The commit is ``GPU_CHECK_COMMIT`` from the environment when set, else the tree's.

The parts leave their files in ``--work``:

- ``pytest/<test file stem>.xml`` (JUnit XML) and ``.rc`` (exit status) per test file
  (the kernel tests, the step harness tests/gpu/test_step_harness.py, ...);
- ``step_bench.json`` and ``.rc`` (scripts/bench_decode_step.py);
- ``bench.json`` and ``.rc`` (scripts/bench_kernels.py --quick);
- ``<part>.time``: start and end, seconds since the epoch.

An ``.rc`` of ``skipped`` marks a part not run (the CPU dry run skips the benchmark).
Writes ``<out-dir>/gpu_check_<device>_<stamp>.json`` and, when the environment
variable OUT names a folder, copies it there with the logs. Exits 0 when every part
that ran passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit(root: Path = ROOT, environ=os.environ) -> dict:
    """The commit checked: ``GPU_CHECK_COMMIT`` from the caller's environment when set
    (a copy of the tree on the GPU machine usually comes without ``.git``), else the
    tree's own (``git_tree_commit``). Where both are known and differ, the tree's is kept
    as ``tree_commit``."""
    tree = git_tree_commit(root)
    given = environ.get("GPU_CHECK_COMMIT", "").strip()
    if not given:
        return tree
    entry = {"commit": given, "source": "GPU_CHECK_COMMIT",
             "modified_tracked_files": tree["modified_tracked_files"] if tree["commit"] == given else None}
    if tree["commit"] and tree["commit"] != given:
        entry["tree_commit"] = tree["commit"]
    return entry


def git_tree_commit(root: Path = ROOT) -> dict:
    """The checked-out commit: ``git rev-parse HEAD`` where git works, else read from
    ``.git`` (HEAD, the ref file or packed-refs); None where neither is there."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=root)
        if out.returncode == 0 and out.stdout.strip():
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=30, cwd=root)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
            return {"commit": out.stdout.strip(), "source": "git rev-parse HEAD", "modified_tracked_files": dirty}
    except (OSError, subprocess.SubprocessError):
        pass
    commit = read_git_head(root / ".git")
    return {"commit": commit, "source": ".git/HEAD" if commit else "no .git", "modified_tracked_files": None}


def read_git_head(git_dir: Path) -> str | None:
    try:
        if git_dir.is_file():  # a worktree: "gitdir: <path>"
            git_dir = (git_dir.parent / git_dir.read_text().split(":", 1)[1].strip()).resolve()
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None  # detached
        ref = head.split(":", 1)[1].strip()
        ref_file = git_dir / ref
        if ref_file.is_file():
            return ref_file.read_text().strip() or None
        packed = git_dir / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        pass
    return None


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for module in ("torch", "triton", "numpy", "pytest"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # a probe must never stop the report
            info[module] = None
    try:
        import torch

        info["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                        device_memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
        else:
            info["device"] = None
    except Exception as e:
        info["device"] = None
        info["device_error"] = f"{type(e).__name__}: {e}"
    try:  # CPU model, cores, RAM (the CPU reference of the step check runs there)
        from headkv_vllm.tools.common.machine import machine_info

        host = machine_info()
        info["host"] = {k: host.get(k) for k in ("cpu", "cpu_cores_usable", "ram_gib", "os")}
    except Exception:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _rc(work: Path, name: str) -> int | str | None:
    path = work / f"{name}.rc"
    if not path.is_file():
        return None
    text = path.read_text().strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _seconds(work: Path, name: str) -> float | None:
    try:
        start, end = map(float, (work / f"{name}.time").read_text().split())
        return round(end - start, 1)
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped / passed of a JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for suite in suites:
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["failed_tests"] = failed[:50]
    return counts


def pytest_part(work: Path) -> dict:
    files = {}
    for rc_file in sorted((work / "pytest").glob("*.rc")):
        name = rc_file.stem
        rc = _rc(work / "pytest", name)
        xml = work / "pytest" / f"{name}.xml"
        entry = {"rc": rc, "seconds": _seconds(work / "pytest", name)}
        if xml.is_file():
            try:
                entry.update(junit_counts(xml))
            except ET.ParseError as e:
                entry["error"] = f"unreadable JUnit XML: {e}"
        else:
            entry["error"] = "no JUnit XML" + (" (timed out)" if rc in (124, 137) else "")
        entry["pass"] = rc == 0 and "error" not in entry and entry.get("tests", 0) > 0 \
            and entry["failures"] == 0 and entry["errors"] == 0
        files[name.replace(".", "/") + ".py"] = entry
    totals = {k: sum(f.get(k, 0) for f in files.values()) for k in ("tests", "passed", "failures", "errors", "skipped")}
    return {"pass": bool(files) and all(f["pass"] for f in files.values()), **totals,
            "seconds": _seconds(work, "pytest"), "files": files}


def json_part(work: Path, name: str) -> dict:
    rc = _rc(work, name)
    if rc == "skipped":
        return {"pass": None, "skipped": True, "rc": rc}
    part = {"rc": rc, "seconds": _seconds(work, name)}
    path = work / f"{name}.json"
    try:
        part["result"] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        part["error"] = f"no result JSON ({type(e).__name__})" + (" (timed out)" if rc in (124, 137) else "")
    part["pass"] = rc == 0 and "result" in part and part["result"].get("pass", True) is not False
    return part


def summary_lines(report: dict) -> list[str]:
    lines = [f"GPU check on {report['machine'].get('device') or 'no CUDA device'}"
             f"{' (CPU dry run)' if report['dry_run'] else ''}: {'PASS' if report['pass'] else 'FAIL'}"]
    p = report["parts"]["tests"]
    lines.append(f"  tests: {'PASS' if p['pass'] else 'FAIL'} {p['passed']} passed, {p['failures']} failed, "
                 f"{p['errors']} errors, {p['skipped']} skipped ({p['seconds']} s)")
    for name, f in p["files"].items():
        if not f["pass"]:
            lines.append(f"    {name}: rc {f['rc']} {f.get('error', '')} {' '.join(f.get('failed_tests', [])[:5])}")
    s = report["parts"]["step_bench"]
    lines.append(_json_part_line("decode step bench", s))
    for row in s.get("result", {}).get("rows", []):
        lines.append(f"    {row['requests']} x {row['prompt']} tokens, KV {row['kv_size']}, {row['dtype']}: "
                     + (f"{row['ms_per_layer']:.3f} ms/layer" if "ms_per_layer" in row else row.get("error", "")))
    lines.append(_json_part_line("kernel bench --quick", report["parts"]["bench_quick"]))
    return lines


def _json_part_line(title: str, part: dict) -> str:
    if part.get("skipped"):
        return f"  {title}: skipped"
    return f"  {title}: {'PASS' if part['pass'] else 'FAIL'} ({part.get('seconds')} s) {part.get('error', '')}"


def build(work: Path, command: str, dry_run: bool, stamp: str) -> dict:
    parts = {"tests": pytest_part(work), "step_bench": json_part(work, "step_bench"),
             "bench_quick": json_part(work, "bench")}
    ran = [p["pass"] for p in parts.values() if not p.get("skipped")]
    return {
        "format": "headkv-gpu-check/2",  # /1 had kernel_tests and step_check; the step check is now tests
        "pass": bool(ran) and all(ran),
        "dry_run": dry_run,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stamp": stamp,
        "seconds": _seconds(work, "total"),
        "git": git_commit(),
        "machine": machine(),
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "TRITON_CACHE_DIR")},
        "parts": parts,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--logs", type=Path, help="log folder, copied to $OUT with the JSON")
    parser.add_argument("--command", default="bash scripts/gpu_check.sh")
    parser.add_argument("--stamp", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results" / "gpu_check")
    args = parser.parse_args(argv)
    report = build(args.work, args.command, args.dry_run, args.stamp)
    slug = "cpu-dry-run" if args.dry_run else device_slug(report["machine"].get("device") or "no-cuda")
    name = f"gpu_check_{slug}_{args.stamp}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / name
    path.write_text(json.dumps(report, indent=1) + "\n")
    lines = summary_lines(report)
    print("\n".join(lines))
    print(f"wrote {path}")
    out = os.environ.get("OUT")
    if out:
        dest = Path(out)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / name)
        if args.logs and args.logs.is_dir():
            shutil.copytree(args.logs, dest / f"gpu_check_logs_{args.stamp}", dirs_exist_ok=True)
        print(f"copied to {dest / name}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
