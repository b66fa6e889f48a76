"""The README's forking table, checked: break each row's place on purpose
(benchmarks/mutations.json), run the row's tests on a scratch copy of the repository, and report
CAUGHT (a test failed) or MISSED.
usage: python benchmarks/mutate.py [NAME_FILTER]      (~5 min on 2 CPU cores)"""
import json, os, shutil, subprocess, sys, tempfile
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
only = sys.argv[1] if len(sys.argv) > 1 else ""
scratch = os.path.join(tempfile.mkdtemp(prefix="urpo-mutate-"), "repo")
rows = []
for m in json.load(open(os.path.join(repo, "benchmarks", "mutations.json"))):
    if only not in m["name"]:
        continue
    shutil.rmtree(scratch, ignore_errors=True)
    skip = shutil.ignore_patterns(".git", ".venv*", "runs", "__pycache__")
    shutil.copytree(repo, scratch, ignore=skip)
    path = os.path.join(scratch, m["file"])
    text = open(path).read()
    if text.count(m["old"]) != 1:
        matches = text.count(m["old"])
        rows.append((m["row"], m["name"], f"NOT APPLIED ({matches} matches)", m["tests"]))
        continue
    open(path, "w").write(text.replace(m["old"], m["new"]))
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    run = subprocess.run(pytest + ["test_all.py", "-k", m["tests"]],
                         cwd=scratch, capture_output=True, text=True)
    tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
    failed = [line.split(" ")[1].split("::")[1] for line in run.stdout.splitlines()
              if line.startswith("FAILED")]
    rows.append((m["row"], m["name"], ("CAUGHT by " + ",".join(failed)) if run.returncode == 1
                 else f"MISSED (rc {run.returncode}: {tail})", m["tests"]))
    print(" | ".join(rows[-1][:3]), flush=True)
print("\n| row | mutation | result |\n|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} |")
