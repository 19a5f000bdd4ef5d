"""Render every kustomization under deploy/kubernetes and check each object it holds, offline.

    python deploy/kubernetes/validate.py [--kubernetes-version 1.30.0] [PATH ...]

PATH: a kustomization directory or a plain YAML file; by default every directory under
deploy/kubernetes with a kustomization.yaml (base/ and each overlay) and deploy/cloudrun/*.yaml.

- Kinds that Kubernetes itself defines: kubernetes-validate's bundled JSON schemas, strict (an
  unknown field is an error, like `kubectl apply --validate=strict`), as `kubectl kustomize DIR |
  kubernetes-validate --strict -k VERSION -` does.
- Cloud Run's WorkerPool: parsed into gcloud's own run v1 messages, as `gcloud run worker-pools
  replace` does first (an unknown field is an error), when the Google Cloud CLI is installed.
- Anything else (KEDA, Managed Prometheus, CREMA): no schema offline. Listed as skipped;
  tests/unit/test_manifests.py holds the fields that matter.

Exit status 1 if a kustomization does not render or an object is invalid, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KUBERNETES_VERSION = "1.30.0"  # the oldest minor GKE's regular channel still runs

# The gcloud side: parse one WorkerPool (JSON on stdin) the way `worker-pools replace` does.
_GCLOUD_CHECK = """
import json, sys
from googlecloudsdk.api_lib.util import apis, messages
run = apis.GetMessagesModule("run", "v1")
try:
    messages.DictToMessageWithErrorCheck(json.load(sys.stdin), run.WorkerPool)
except Exception as exc:
    print(" ".join(str(exc).split()))
    sys.exit(1)
"""


def default_paths() -> list[Path]:
    kustomizations = sorted(p.parent for p in HERE.rglob("kustomization.yaml"))
    return [*kustomizations, *sorted((REPO / "deploy" / "cloudrun").glob("*.yaml"))]


def render(path: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization (rendered by kubectl's kustomize) or of a YAML file."""
    if path.is_dir():
        kubectl = shutil.which("kubectl")
        if not kubectl:
            raise SystemExit("validate: kubectl not found (apt-get install kubectl, from the Google Cloud CLI's repository)")
        done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
        if done.returncode:
            raise ValueError(f"kubectl kustomize failed: {done.stderr.strip()}")
        text = done.stdout
    else:
        text = path.read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def gcloud_python() -> tuple[str, str] | None:
    """(a Python, its PYTHONPATH) to run the Google Cloud CLI's libraries; None without the CLI."""
    gcloud = shutil.which("gcloud")
    if not gcloud:
        return None
    sdk = Path(os.path.realpath(gcloud)).parents[1]
    if not (sdk / "lib" / "googlecloudsdk").is_dir():
        return None
    bundled = sdk / "platform" / "bundledpythonunix" / "bin" / "python3"
    python = os.environ.get("CLOUDSDK_PYTHON") or (str(bundled) if bundled.exists() else sys.executable)
    return python, f"{sdk / 'lib'}{os.pathsep}{sdk / 'lib' / 'third_party'}"


def check_worker_pool(doc: dict[str, Any]) -> tuple[str, str]:
    """Like `check`, for a Cloud Run WorkerPool: parsed by gcloud's libraries when they are here."""
    runner = gcloud_python()
    if runner is None:
        return "skipped", "the Google Cloud CLI is not installed"
    python, pythonpath = runner
    env = dict(os.environ, PYTHONPATH=pythonpath)
    done = subprocess.run([python, "-c", _GCLOUD_CHECK], input=json.dumps(doc), capture_output=True, text=True, env=env)
    if done.returncode and not done.stdout:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return "skipped", f"gcloud's libraries did not load: {last}"
    if done.returncode:
        return "invalid", done.stdout.strip()
    return "ok", "gcloud's run v1 messages"


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')} ({doc.get('apiVersion')})"


def check(doc: dict[str, Any], version: str) -> tuple[str, str]:
    """('ok' | 'invalid' | 'skipped', detail) for one object."""
    if doc.get("apiVersion") == "run.googleapis.com/v1" and doc.get("kind") == "WorkerPool":
        return check_worker_pool(doc)
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return "skipped", "no schema offline: tests/unit/test_manifests.py holds its fields"
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(top)"
        return "invalid", f"{where}: {exc.message}"
    return "ok", f"Kubernetes {version} schema, strict"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubernetes-version", "-k", default=KUBERNETES_VERSION)
    parser.add_argument("paths", nargs="*", type=Path)
    args = parser.parse_args(argv)
    failed = 0
    for path in args.paths or default_paths():
        shown = os.path.relpath(path, REPO) if path.is_absolute() and path.is_relative_to(REPO) else str(path)
        try:
            docs = render(path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"FAIL {shown}: {exc}")
            failed += 1
            continue
        results = [(describe(doc), *check(doc, args.kubernetes_version)) for doc in docs]
        bad = [r for r in results if r[1] == "invalid"]
        failed += len(bad)
        valid = [str(doc.get("kind")) for doc, (_, status, _) in zip(docs, results) if status == "ok"]
        print(f"{'FAIL' if bad else 'ok  '} {shown}: {len(valid)} valid" + (f" ({', '.join(valid)})" if valid else ""))
        for name, status, detail in results:
            if status != "ok":
                print(f"     {status} {name}: {detail}")
    if failed:
        print(f"validate: {failed} problem(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
