"""Offline checks of the training Job manifest (used by ../validate_k8s.sh).

  python check_manifest.py [-k 1.27.0 -k 1.31.0 ...] FILE...  # validate files
  python check_manifest.py --self-test [-k ...]            # + broken copies must fail

For each file, two checks, both must pass:
  1. schema: the OpenAPI JSON schema of each Kubernetes version, strict (unknown
     fields are errors), through the `kubernetes-validate` package's API. A kind it has
     no schema for is an error too (its CLI only warns).
  2. consistency: what no schema can see - the headless Service selects the pods, the
     pod subdomain is the Service, RDZV_HOST is pod 0's DNS name "<job>-0.<service>",
     completions = parallelism = NNODES, completionMode is Indexed, an image is set,
     resource quantities are well-formed.
Exit status: 0 when every file (and, with --self-test, every broken copy) behaves.
All in one process: importing jsonschema can take seconds in a Jupyter environment.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

import yaml

MANIFEST = Path(__file__).with_name("train-job.yaml")
VERSIONS = ("1.27.0", "1.31.0", "1.37.0")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")

# Broken copies for --self-test: (name, text to replace, replacement).
BREAKS = [
    ("wrong-type", "  parallelism: 2 ", '  parallelism: "two" '),
    ("typo-field", "      subdomain: llm-ddp ", "      subdomian: llm-ddp "),
    ("unknown-kind", "\nkind: Job\n", "\nkind: Jobb\n"),
    ("bad-enum", "  completionMode: Indexed ", "  completionMode: Indexd "),
    ("subdomain-mismatch", "      subdomain: llm-ddp ", "      subdomain: trainers "),
    ("parallelism-lt-completions", "  parallelism: 2 ", "  parallelism: 1 "),
    ("bad-quantity", "              memory: 4Gi", "              memory: lots"),
    (
        "wrong-rdzv-host",
        "              value: llm-ddp-0.llm-ddp",
        "              value: llm-ddp-1.llm-ddp",
    ),
]


def _kubernetes_validate():
    # jsonschema imports rfc3987_syntax (when installed, as Jupyter does) only for an
    # optional "format" checker that schema validation here never uses; building its
    # grammar takes seconds. Block it: jsonschema then just skips that checker.
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)
    import kubernetes_validate as kv
    import kubernetes_validate.utils as kvu

    if not hasattr(kvu.schema_contents, "cache_info"):
        # validate() re-reads the multi-MB definitions on every call; read them once.
        kvu.schema_contents = functools.lru_cache(maxsize=None)(kvu.schema_contents)
    return kv


def schema_errors(docs: list[dict], version: str) -> list[str]:
    kv = _kubernetes_validate()
    errors = []
    for d in docs:
        name = f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{name}: {where}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"{name}: {e.message}")
    return errors


def consistency_errors(docs: list[dict]) -> list[str]:
    errors: list[str] = []

    def need(cond, msg):
        if not cond:
            errors.append(msg)

    kinds: dict[str, list[dict]] = {}
    for d in docs:
        kinds.setdefault(d.get("kind"), []).append(d)
    jobs, svcs = kinds.get("Job", []), kinds.get("Service", [])
    need(len(jobs) == 1, f"expected exactly one Job, found {len(jobs)}")
    need(len(svcs) == 1, f"expected exactly one Service, found {len(svcs)}")
    if errors:
        return errors
    job, svc = jobs[0], svcs[0]
    js, ss = job.get("spec") or {}, svc.get("spec") or {}
    pod = js.get("template") or {}
    ps = pod.get("spec") or {}
    labels = (pod.get("metadata") or {}).get("labels") or {}
    svc_name, job_name = svc["metadata"]["name"], job["metadata"]["name"]
    need(
        ss.get("clusterIP") == "None", "the Service must be headless (clusterIP: None)"
    )
    sel = ss.get("selector") or {}
    need(
        sel and all(labels.get(k) == v for k, v in sel.items()),
        f"Service selector {sel} does not match the pod labels {labels}",
    )
    need(
        ps.get("subdomain") == svc_name,
        f"pod subdomain {ps.get('subdomain')!r} must be the Service name {svc_name!r}",
    )
    need(
        js.get("completionMode") == "Indexed",
        f"completionMode must be Indexed, not {js.get('completionMode')!r}",
    )
    n = js.get("completions")
    need(
        isinstance(n, int) and n >= 1 and js.get("parallelism") == n,
        f"parallelism ({js.get('parallelism')}) must equal completions ({n})",
    )
    env: dict[str, str] = {}
    for cm in kinds.get("ConfigMap", []):
        env.update(cm.get("data") or {})
    containers = ps.get("containers") or []
    need(len(containers) >= 1, "the pod has no container")
    for c in containers:
        need(bool(c.get("image")), f"container {c.get('name')!r} has no image")
        env.update({e["name"]: e["value"] for e in c.get("env") or [] if "value" in e})
        for kind in ("requests", "limits"):
            for k, q in ((c.get("resources") or {}).get(kind) or {}).items():
                need(
                    QUANTITY.fullmatch(str(q)),
                    f"{c.get('name')!r}: {kind}.{k}={q!r} is not a Kubernetes quantity",
                )
    if "NNODES" in env:
        need(
            str(env["NNODES"]) == str(n),
            f"ConfigMap NNODES={env['NNODES']} but completions={n}",
        )
    want = f"{job_name}-0.{svc_name}"
    need(
        "RDZV_HOST" in env and env["RDZV_HOST"].split(".")[:2] == want.split("."),
        f"RDZV_HOST={env.get('RDZV_HOST')!r} must be pod 0's DNS name {want!r}",
    )
    return errors


def check_text(text: str, label: str, versions) -> bool:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        print(f"  [yaml] ERROR {label}: {e}")
        return False
    ok = True
    for v in versions:
        errs = schema_errors(docs, v)
        print(f"  [schema {v}] " + ("OK" if not errs else "ERROR " + "; ".join(errs)))
        ok &= not errs
    errs = consistency_errors(docs)
    print("  [consistency] " + ("OK" if not errs else "ERROR " + "; ".join(errs)))
    return ok and not errs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("-k", "--kubernetes-version", action="append", dest="versions")
    p.add_argument("--self-test", action="store_true")
    a = p.parse_args(argv)
    versions = a.versions or VERSIONS
    kubernetes_validate = _kubernetes_validate()

    print(
        f"kubernetes-validate {kubernetes_validate.__version__},"
        f" Kubernetes schemas {' '.join(versions)}"
    )
    status = 0
    for f in a.files or ([] if a.self_test else [MANIFEST]):
        print(f"== {f}")
        ok = check_text(f.read_text(), str(f), versions)
        print(("VALID   " if ok else "INVALID ") + str(f))
        status |= not ok
    if a.self_test:
        good = MANIFEST.read_text()
        print(f"== {MANIFEST} must pass")
        if not check_text(good, str(MANIFEST), versions):
            print("FAIL: the real manifest was rejected")
            status = 1
        for name, old, new in BREAKS:
            assert good.count(old) == 1, (
                f"break {name!r}: {old!r} is not in the manifest once"
            )
            print(f"== broken copy '{name}' ({old.strip()!r} -> {new.strip()!r})")
            if check_text(good.replace(old, new), name, versions):
                print(f"FAIL: broken copy '{name}' was accepted")
                status = 1
            else:
                print("  -> rejected, as it should be")
        if status == 0:
            print(
                f"self-test OK: the manifest is accepted,"
                f" all {len(BREAKS)} broken copies are rejected"
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
