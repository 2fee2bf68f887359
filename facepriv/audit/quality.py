"""Image quality of every (protected, original) pair, with bounded memory (:func:`_quality`)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..core.io import load_image
from ..core.progress import make_progress
from .common import _r
from .config import AuditConfig
from .metrics import QualityMeter

QUALITY_CHUNK_PIXELS = 24_000_000  # pixels (protected + original) measured at once: ~290 MB as float


def _quality(cfg: AuditConfig, pairs, rows, device, meter: QualityMeter | None) -> dict:
    """Quality of every pair, with bounded memory whatever the photos' size.

    Images are read ahead by ``cfg.workers`` threads (at most ``workers + 2`` pairs waiting,
    kept as decoded 8/16-bit arrays, not float) and fed to the meter in chunks of at most
    ``cfg.batch_size`` pairs and :data:`QUALITY_CHUNK_PIXELS` pixels (so a chunk of 24 MP photos
    is one or two pairs, a chunk of small crops a whole batch); only the chunk being measured is
    float. ``add_many`` is used where the meter has it, else ``add`` per pair. An unreadable
    image fails only its own row; a chunk the meter rejects is redone pair by pair, so only the
    pair at fault fails."""
    meter = meter or QualityMeter(lpips=cfg.lpips, fid=cfg.fid, device=device, download=cfg.download)
    by_rel = {r["protected"]: r for r in rows}
    add_many = getattr(meter, "add_many", None)

    def load(fp):
        try:
            return fp, (load_image(fp.protected, max_pixels=cfg.max_pixels),
                        load_image(fp.original, max_pixels=cfg.max_pixels)), None
        except Exception as exc:  # noqa: BLE001 - quality of one image never stops the audit
            return fp, None, str(exc)

    def pixels(pair) -> int:
        return sum(im.size[0] * im.size[1] for im in pair)

    def fmt(q: dict) -> dict:
        return {k: (_r(v) if isinstance(v, float) else v) for k, v in q.items()}

    def one(fp, pair):
        try:
            by_rel[fp.rel]["quality"] = fmt(meter.add(pair[0].to_tensor(), pair[1].to_tensor()))
        except Exception as exc:  # noqa: BLE001
            by_rel[fp.rel]["quality"] = {"error": str(exc)}

    def feed(chunk: list) -> None:
        if not chunk:
            return
        if add_many is None or len(chunk) == 1:
            for fp, pair in chunk:
                one(fp, pair)
            return
        try:
            qs = add_many([(a.to_tensor(), b.to_tensor()) for _, (a, b) in chunk])
        except Exception:  # noqa: BLE001 - find the pair at fault
            for fp, pair in chunk:
                one(fp, pair)
            return
        for (fp, _), q in zip(chunk, qs):
            by_rel[fp.rel]["quality"] = fmt(q)

    batch = max(1, cfg.batch_size)
    ahead = max(1, cfg.workers) + 2
    with make_progress(enabled=cfg.progress) as bar, ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        task = bar.add_task("quality", total=len(pairs))
        queue: deque = deque()
        it = iter(pairs)
        for fp in it:
            queue.append(pool.submit(load, fp))
            if len(queue) >= ahead:
                break
        chunk: list = []
        chunk_px = 0
        while queue:
            fp, pair, err = queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(load, nxt))
            if err is not None:
                by_rel[fp.rel]["quality"] = {"error": err}
                bar.advance(task)
                continue
            px = pixels(pair)
            if chunk and chunk_px + px > QUALITY_CHUNK_PIXELS:  # this pair would overflow the chunk
                feed(chunk)
                bar.advance(task, len(chunk))
                chunk, chunk_px = [], 0
            chunk.append((fp, pair))
            chunk_px += px
            if len(chunk) >= batch:
                feed(chunk)
                bar.advance(task, len(chunk))
                chunk, chunk_px = [], 0
        feed(chunk)
        bar.advance(task, len(chunk))
    out = meter.summary()
    return {k: (_r(v) if isinstance(v, float) else v) for k, v in out.items()}


def measure_quality(cfg: AuditConfig, pairs, rows, device, meter: QualityMeter | None
                    ) -> tuple[dict, QualityMeter | None]:
    """The report's ``quality`` and the meter that measured it (``meter``, or one built from
    ``cfg``); with ``--no-quality`` every figure is None and there is no meter."""
    if not cfg.quality:
        return {"psnr": None, "ssim": None, "lpips": None, "fid": None,
                "unavailable": {"all": "disabled (--no-quality)"}}, None
    meter = meter or QualityMeter(lpips=cfg.lpips, fid=cfg.fid, device=device, download=cfg.download)
    return _quality(cfg, pairs, rows, device, meter), meter
