"""The online face-comparison services (``--api``): adapters built before any work, the
comparisons each image sends, and their summary."""

from __future__ import annotations

from pathlib import Path

from ..core.secrets import redact
from . import inputs as inp
from .common import _r, _rel_label
from .config import AuditConfig
from .identities import TargetSet
from .metrics import mean_or_none


def build_apis(cfg: AuditConfig) -> dict:
    """The online adapters ``cfg.apis`` asks for, created (keys, boto3, config file and endpoint
    checked) before any work: a missing key is a :class:`ConfigError` here, not after the
    embedding. Adapters are keyed by the name given; a provider named twice is used once."""
    if not cfg.apis:
        return {}
    from .apis import canonical_name, create_api

    adapters: dict = {}
    seen: set[str] = set()
    for name in cfg.apis:
        key = canonical_name(name)
        if key in seen:
            continue
        seen.add(key)
        adapters[name] = create_api(name, endpoint=cfg.api_endpoint.get(key), config=cfg.api_config,
                                    threshold=cfg.api_threshold.get(key), concurrency=cfg.api_concurrency,
                                    rate=cfg.api_rate, cache=cfg.api_cache, timeout=cfg.api_timeout,
                                    retries=cfg.api_retries)
    return adapters


def api_jobs(cfg: AuditConfig, row: int, fp: inp.FilePair, refs: list[Path], targets: TargetSet,
             skip: set[int]) -> list[tuple]:
    """The comparisons image ``fp`` (row index ``row``) sends to every service: its primary face
    against the same (sampled) references as the local models, at most ``api_max_refs`` (its own
    original where it has none: self-verification), and against at most ``api_max_refs`` target
    photos, less those in ``skip``. Each job is (row index, kind, protected, reference, reference
    label, dodging protocol)."""
    jobs: list[tuple] = []
    if refs:
        for r in refs[: cfg.api_max_refs]:
            jobs.append((row, "dodging", fp.protected, r, _rel_label(r, cfg), "other-photos"))
    else:
        jobs.append((row, "dodging", fp.protected, fp.original, fp.original_rel, "self"))
    api_targets = [k for k in range(len(targets.ok)) if k not in skip]
    for k in api_targets[: cfg.api_max_refs]:
        jobs.append((row, "impersonation", fp.protected, targets.ok[k], targets.labels[k], None))
    return jobs


def _run_apis(cfg: AuditConfig, rows: list[dict], jobs: list, adapters: dict) -> dict:
    """Send the jobs to every adapter (built by :func:`build_apis` before the audit started)."""
    out = {}
    for name, api in adapters.items():
        results = api.compare_many([(j[2], j[3]) for j in jobs], progress=cfg.progress,
                                   description=f"{name} ({len(jobs)} comparisons)")
        records: dict[str, list] = {}
        protocols: dict[str, int] = {}
        for (ri, kind, _, _, ref, protocol), res in zip(jobs, results):
            rec = {"kind": kind, "reference": ref, "score": res.score, "thresholds": res.thresholds,
                   "error": res.error, "no_face_in": res.no_face_in if res.no_face else None, "cached": res.cached}
            if getattr(res, "note", None):  # what the adapter did to the images (re-encoded, upscaled)
                rec["note"] = res.note
            if protocol:
                rec["protocol"] = protocol
                protocols[protocol] = protocols.get(protocol, 0) + 1
            rows[ri].setdefault("apis", {}).setdefault(name, []).append(rec)
            records.setdefault(kind, []).append(res)
        summary = {"provider": api.describe(), "calls": api.calls, **api.stats, **_api_status(api, results)}
        for kind, recs in records.items():
            summary[kind] = _api_summary(recs, kind)
        if "dodging" in summary:
            summary["dodging"]["protocol"] = protocols
        out[name] = summary
    return redact(out)


def _api_status(api, results: list) -> dict:
    """Whether a provider worked: ``status`` ok | some-errors | failed (every pair failed) |
    stopped (a fatal error, e.g. rejected credentials, stopped the adapter), with ``stopped``
    (the adapter's stop reason) and ``first_error`` (already redacted by the adapter)."""
    failed = [r for r in results if not r.ok and not r.no_face]
    stopped = getattr(api, "stopped_reason", None)
    if not stopped:
        gone = next((r.error for r in failed if r.code == "ADAPTER_STOPPED" and r.error), None)
        stopped = gone.removeprefix("not sent: ") if gone else None
    first = next((r.error for r in failed if r.error and r.code != "ADAPTER_STOPPED"), None)
    first = first or next((r.error for r in failed if r.error), None)
    if stopped:
        status = "stopped"
    elif results and len(failed) == len(results):
        status = "failed"
    elif failed:
        status = "some-errors"
    else:
        status = "ok"
    return {"status": status, "stopped": redact(stopped) if stopped else None,
            "first_error": redact(first) if first else None, "pairs": len(results), "failed_pairs": len(failed)}


def _api_summary(results: list, kind: str) -> dict:
    """PSR of one provider at each of its threshold keys (Face++: per-response thresholds).

    A protected photo in which the service finds no face counts as protected (dodging) /
    failed (impersonation); a reference without a face, and errors, are left out and counted.
    """
    ok = [r for r in results if r.ok]
    keys = sorted({k for r in ok for k in r.thresholds})
    prot_no_face = [r for r in results if not r.ok and r.no_face and r.no_face_in == 1]
    outcome: dict[str, list[bool]] = {}
    seen: dict[str, list[float]] = {}
    for k in keys:
        ver = [r.score >= r.thresholds[k] for r in ok if k in r.thresholds]
        ver += [False] * len(prot_no_face)
        outcome[k] = ver
        vals = [r.thresholds[k] for r in ok if k in r.thresholds]
        seen[k] = [min(vals), max(vals)]
    if kind == "dodging":
        rates = {k: (sum(1 for v in vs if not v) / len(vs)) if vs else None for k, vs in outcome.items()}
    else:
        rates = {k: (sum(1 for v in vs if v) / len(vs)) if vs else None for k, vs in outcome.items()}
    return {"n": len(ok) + len(prot_no_face), "psr": rates, "mean_score": _r(mean_or_none([r.score for r in ok])),
            "no_face_protected": len(prot_no_face),
            "no_face_other": sum(1 for r in results if not r.ok and r.no_face and r.no_face_in != 1),
            "errors": sum(1 for r in results if not r.ok and not r.no_face),
            "cached": sum(1 for r in results if r.cached), "thresholds_seen": seen}
