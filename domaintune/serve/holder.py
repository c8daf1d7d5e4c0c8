"""The model the server answers with, following the registry's served version.

ModelHolder.current is one LoadedModel, replaced by a single reference assignment:
a batch takes the reference when it starts and finishes on that model, so a swap
never interrupts a request in flight. A new version is materialised (every file
md5-verified against its dvc.lock, domaintune/registry/release.py), loaded and run once on a
warm-up text before it replaces the old one; if any step fails the old model keeps
serving, and the failure is logged and kept in `last_error` (shown by /v2/health/ready).
A version that failed is tried again after `retry_s`, then after twice as long each time up to
`retry_max_s` (a repaired cache object, a remote back online): when it loads, it is swapped in and
`last_error` is cleared. After each swap the materialised releases no longer needed are removed
(release.prune: all but the served, the shadow and `keep_releases` previous ones).
Every export is opened by domaintune.tasks.load_predictor (the one loader `predict` and `monitor`
use too), so the server takes a classifier or a generation export alike; LoadedModel.task says
which routes answer with it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from domaintune.core.device import MAX_BATCH_TOKENS
from domaintune.export.variants import AUTO
from domaintune.monitor import guard
from domaintune.monitor.feedback import feedback_labels
from domaintune.registry import diff, plumbing, promotion, release, rollback, versions
from domaintune.serve.settings import ServeSettings
from domaintune.serve.shadow import read_log
from domaintune.tasks import export_task, load_predictor

log = logging.getLogger("domaintune.serve")
WARMUP_TEXTS = ["warm-up text for a freshly loaded model"]


@dataclass
class LoadedModel:
    predictor: object            # domaintune.predict.predictor.Predictor or .generation.GenerationPredictor
    version: str                 # "v1.2.0", "workspace", or "dir:<name>" for a folder
    variant: str                 # the variant loaded (auto resolved: domaintune.export.variants.resolve_variant)
    path: Path
    task: str = "classification"  # domaintune.tasks.TASKS: which routes this model answers
    tag: str | None = None
    commit: str | None = None
    dataset_hash: str | None = None
    metrics: dict = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    variant_choice: str | None = None  # how the variant was chosen, e.g. "onnx-int8 (auto: fastest passing, ...)"

    @property
    def labels(self) -> list[str]:
        return list(self.predictor.labels)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.predictor.predict_proba(texts), dtype=np.float64)

    @property
    def abstain_label(self) -> str | None:
        """What the model answers where it abstains (evaluate.abstain.label); None if it never abstains."""
        ab = getattr(self.predictor, "abstainer", None)
        return None if ab is None else ab.label

    def predict_with_abstention(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated probabilities, abstained per text or None) from one pass."""
        if self.abstain_label is None:
            return self.predict_proba(texts), None
        probs, abstained = self.predictor.predict_with_abstention(texts)
        return np.asarray(probs, dtype=np.float64), np.asarray(abstained, dtype=bool)

    def decide(self, probs: np.ndarray) -> list[str]:
        """Predicted label per row (multi-label: the labels over their thresholds, joined)."""
        if getattr(self.predictor, "problem_type", "single_label") == "multi_label":
            return self.predictor.labels_from_proba(probs)
        labels = self.labels
        return [labels[i] for i in probs.argmax(axis=1)]

    def info(self, full: bool = False) -> dict:
        """What /version says of this model: the headline metrics (all of them with `full`)."""
        return {"version": self.version, "task": self.task, "tag": self.tag, "commit": self.commit,
                "versioned": self.tag is not None, "variant": self.variant,
                "variant_choice": self.variant_choice or self.variant,
                "dataset_hash": self.dataset_hash, "metrics": self.metrics if full else diff.headline(self.metrics),
                "labels": self.labels, "path": str(self.path), "loaded_at": self.loaded_at}


WORKSPACE_EXPORT = Path("models/export")


def workspace_info(root: Path, folder: Path) -> dict:
    """What an unversioned export folder says of itself: the dataset hash in its model.json (export_info.json
    for a causal LM), and, for the project's own models/export, the evaluate stage's metrics next to it."""
    info: dict = {}
    for name in ("model.json", "export_info.json"):
        try:
            meta = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        info["dataset_hash"] = meta.get("dataset_hash")
        break
    if folder.resolve() == (root / WORKSPACE_EXPORT).resolve():
        try:
            info["metrics"] = {"evaluate": json.loads((root / "metrics" / "evaluate.json").read_text(encoding="utf-8"))}
        except (OSError, ValueError):
            pass
    return info


def load_folder(path: Path, variant: str, version: str, batch_size: int = 64, device: str = "cpu",
                verify: bool = True, max_batch_tokens: int = MAX_BATCH_TOKENS, **info) -> LoadedModel:
    """Load an export folder and run it once, so a model that loads but cannot predict is caught here.
    A classifier runs in passes of at most `batch_size` texts within `max_batch_tokens` (Predictor)."""
    task = export_task(path)
    budget = {"max_batch_tokens": max_batch_tokens} if task == "classification" else {}  # generation: by count
    predictor = load_predictor(path, variant=variant, batch_size=batch_size, device=device, verify=verify, **budget)
    choice = getattr(predictor, "variant_choice", None)  # a classifier says which variant auto resolved to
    resolved = choice.variant if choice is not None else "float32" if variant == AUTO else variant
    model = LoadedModel(predictor, version, resolved, Path(path), task, **info,
                        variant_choice=choice.note if choice is not None else resolved)
    if task == "generation":
        out = predictor.generate(WARMUP_TEXTS, max_new_tokens=1)
        if len(out) != 1 or not isinstance(out[0].text, str):
            raise ValueError(f"{path}: warm-up generation returned {out!r}")
        return model
    probs = model.predict_proba(WARMUP_TEXTS)
    if probs.shape != (1, len(model.labels)) or not np.isfinite(probs).all():
        raise ValueError(f"{path}: warm-up prediction has shape {probs.shape} or non-finite values "
                         f"(expected 1 x {len(model.labels)} probabilities)")
    return model


def load_version(root: Path, name: str | None, settings: ServeSettings) -> LoadedModel:
    """Materialise (verify) a published version - the served one for None - and load it."""
    rel = release.materialise(root, name)
    v = rel.version
    # materialise just checked every file against the version's DVC md5s: checksums.json would read them again
    return load_folder(rel.path, settings.variant, v.version, settings.infer_batch, settings.device, verify=False,
                       max_batch_tokens=settings.max_batch_tokens, tag=v.tag,
                       commit=v.commit, dataset_hash=rel.dataset_hash, metrics=rel.metrics)


def load_model_spec(spec: str, root: Path, settings: ServeSettings) -> LoadedModel:
    """A shadow candidate: an existing folder, else a version name in the registry at `root`."""
    path = Path(spec)
    if path.is_dir():
        return load_folder(path, settings.variant, f"dir:{path.resolve().name}", settings.infer_batch,
                           settings.device, max_batch_tokens=settings.max_batch_tokens)
    return load_version(root, spec, settings)


CHALLENGER = "challenger"  # --shadow challenger: the shadow is the registry's waiting challenger, followed live


def registry_state(root: Path) -> str:
    """Changes whenever a version is published or the prod stage moves (cheap: one git call)."""
    refs = f"refs/tags/{plumbing.ARTIFACT}"
    return plumbing.git(root, "for-each-ref", "--format=%(refname) %(objectname)", refs + "@*", refs + "#*")


class ModelHolder:
    def __init__(self, settings: ServeSettings, metrics=None):
        self.settings = settings
        self.root = Path(settings.repo).resolve()
        self.metrics = metrics
        self.current: LoadedModel | None = None
        self.shadow: LoadedModel | None = None
        self.last_error: dict | None = None
        self.swaps = 0
        self._state: str | None = None
        self._failures = 0                # consecutive failed loads of the served version
        self._retry_at: float | None = None  # time.monotonic() of the next try, after a failure
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.shadowed = 0                 # texts the shadow answered (the batcher counts them)
        self.guard: dict | None = None    # after a promotion: the previous champion shadows the new one
        self.guard_result: dict | None = None  # the last guard's verdict (shown by /version)
        self.shadow_log_path: Path | None = None  # where the shadow answers are logged (app.build sets it)

    @property
    def follows_registry(self) -> bool:
        return self.settings.model_dir is None

    @property
    def shadow_follows_challenger(self) -> bool:
        return self.follows_registry and self.settings.shadow == CHALLENGER

    def load_initial(self) -> LoadedModel:
        """The first model (raises if it cannot be loaded: there is nothing to fall back on) and the shadow."""
        s = self.settings
        if self.follows_registry:
            self._state = registry_state(self.root)
            if versions.served_version(self.root) is None and (self.root / WORKSPACE_EXPORT).is_dir():
                folder = self.root / WORKSPACE_EXPORT  # nothing promoted yet (right after `make run`)
                log.warning("no version is served yet (domaintune retrain publishes one): serving the workspace "
                            "export %s, unversioned; a version is picked up when one is served", folder)
                self.current = load_folder(folder, s.variant, "workspace", s.infer_batch, s.device,
                                           max_batch_tokens=s.max_batch_tokens,
                                           **workspace_info(self.root, folder))
            else:
                self.current = load_version(self.root, None, s)
        else:
            folder = Path(s.model_dir)
            self.current = load_folder(folder, s.variant, "workspace", s.infer_batch, s.device,
                                           max_batch_tokens=s.max_batch_tokens,
                                       **workspace_info(self.root, folder))
        if self.shadow_follows_challenger:
            self._follow_challenger()
        elif s.shadow:
            self.shadow = load_model_spec(s.shadow, self.root, s)
        if self.shadow is not None:
            if {self.current.task, self.shadow.task} - {"classification"}:
                raise ValueError(f"--shadow compares the labels of two classifiers; the served model is a "
                                 f"{self.current.task} export and the candidate a {self.shadow.task} export")
        log.info("serving %s (variant: %s) from %s", self.current.version, self.current.variant_choice,
                 self.current.path)
        if self.metrics:
            self.metrics.set_models(self.current, self.shadow)
        return self.current

    def refresh(self) -> bool:
        """Swap to the registry's served version if it changed; True when a swap happened."""
        if not self.follows_registry:
            return False
        with self._refresh_lock:
            state = registry_state(self.root)
            if self.last_error is not None and self.last_error["version"] is None:
                self.last_error = None  # the registry answers again (a failed poll, below in _watch)
            if state == self._state and (self._retry_at is None or time.monotonic() < self._retry_at):
                return False
            self._state = state
            swapped = self._follow()
            if self.shadow_follows_challenger and self.guard is None:
                self._follow_challenger()
            return swapped

    def _follow_challenger(self) -> None:
        """Shadow the registry's waiting challenger (none waiting: no shadow); a failure keeps the old shadow."""
        name = promotion.challenger(self.root)
        if name == (self.shadow.version if self.shadow else None):
            return
        if name is None:
            self._set_shadow(None)
            return
        try:
            self._set_shadow(load_version(self.root, name, self.settings))
        except Exception as exc:  # noqa: BLE001 - a challenger that cannot load is not shadowed; serving goes on
            log.error("challenger %s failed to load or verify; not shadowed: %s", name, exc)

    def _set_shadow(self, model: "LoadedModel | None") -> None:
        old, self.shadow = self.shadow, model
        if (old.version if old else None) != (model.version if model else None):
            log.info("shadow: %s -> %s", old.version if old else None, model.version if model else None)
        if self.metrics:
            self.metrics.set_models(self.current, self.shadow)

    def _start_guard(self, new: "LoadedModel", old: "LoadedModel") -> None:
        """After a promotion the replaced champion shadows the new one for release.guard_requests texts."""
        n = self.settings.guard_requests
        if n <= 0 or old is None or old.tag is None or {new.task, old.task} - {"classification"}:
            return
        last = [e for e in promotion.events(self.root) if e.version == new.version]
        if not last or last[-1].stage != plumbing.SERVED_STAGE or last[-1].op != "promote":
            return  # a rollback (by hand or by the guard) is not watched against what it replaced
        self.guard = {"champion": new.version, "previous": old.version, "requests": n, "start": self.shadowed}
        self._set_shadow(old)
        log.info("guard: %s now shadows the new champion %s for %d requests", old.version, new.version, n)

    def guard_due(self) -> bool:
        return self.guard is not None and self.shadowed - self.guard["start"] >= self.guard["requests"]

    def check_guard(self, rows_of, labels_of=lambda: {}) -> dict | None:
        """Once the guard's requests are shadowed: judge the new champion against the previous one on them
        (domaintune.monitor.guard); worse at 95% -> the verified rollback to the previous champion, and the new
        one marked rejected with the evidence. rows_of(): the shadow log's rows; labels_of(): feedback labels.
        Returns the verdict, or None while the guard is not due."""
        if not self.guard_due():
            return None
        g, self.guard = self.guard, None
        rows = guard.pair_rows(rows_of(), g["champion"], g["previous"])
        if not rows:
            log.warning("guard: no logged requests for %s vs %s; nothing judged", g["champion"], g["previous"])
            return None
        p = self.settings
        verdict = guard.judge(rows, "served", p.max_regression, labels_of(), p.resamples, p.seed)
        verdict.update(champion=g["champion"], previous=g["previous"])
        line = (f"{g['champion']} vs {g['previous']}: accuracy {verdict['diff']:+.3f} "
                f"[{verdict['low']:+.3f}, {verdict['high']:+.3f}] on {verdict['rows']:,} live requests "
                f"({verdict['basis']}), agreement {verdict['agreement']:.3f}")
        if verdict["worse"]:
            reason = f"guard: worse than {g['previous']} on live traffic: {line}"
            with plumbing.repo_lock(self.root):
                note = rollback.recover(self.root)
                if note:
                    log.warning("guard: %s", note)
                rollback.rollback(self.root, g["previous"])
                promotion.reject(self.root, g["champion"], reason, {"guard": verdict})
            verdict["action"] = f"rolled back to {g['previous']}; {g['champion']} rejected"
            log.error("guard: %s: %s", verdict["action"], line)
            self.refresh()  # swap back now, not at the next poll
        else:
            verdict["action"] = "kept"
            log.info("guard: kept %s: %s", g["champion"], line)
        self.guard_result = verdict
        self._set_shadow(None)
        if self.shadow_follows_challenger:
            self._follow_challenger()
        return verdict

    def _follow(self) -> bool:
        served = versions.served_version(self.root)
        if served is None or (self.current and served == self.current.version):
            if served is not None:
                self.last_error = None  # e.g. rolled back to the version still serving: nothing is wrong now
            self._failures, self._retry_at = 0, None
            return False
        if self.last_error is None or self.last_error.get("version") != served:
            self._failures = 0  # another version: its own back-off
        t0 = time.perf_counter()
        try:
            new = load_version(self.root, served, self.settings)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the old model keeps serving
            self._failures += 1
            delay = min(self.settings.retry_s * 2 ** (self._failures - 1), self.settings.retry_max_s)
            self._retry_at = time.monotonic() + delay
            self.last_error = {"version": served, "error": str(exc), "at": time.time(),
                               "kept": self.current.version if self.current else None,
                               "failures": self._failures, "retry_in_s": delay}
            log.error("served version %s failed to load or verify (%d in a row); still serving %s, trying again "
                      "in %g s: %s", served, self._failures, self.last_error["kept"], delay, exc)
            if self.metrics:
                self.metrics.load_failures.inc()
            return False
        old, self.current = self.current, new  # the swap: one reference assignment
        self.swaps += 1
        self._start_guard(new, old)
        self.last_error, self._failures, self._retry_at = None, 0, None
        if self.metrics:
            self.metrics.swaps.inc()
            self.metrics.set_models(new, self.shadow)
        log.info("swapped %s -> %s in %.1f s", old.version if old else None, new.version, time.perf_counter() - t0)
        self._prune()
        return True

    def _prune(self) -> None:
        """Remove the materialised releases no longer needed; a failure is logged, serving goes on."""
        keep = [m.tag for m in (self.current, self.shadow) if m is not None and m.tag]
        try:
            removed = release.prune(self.root, keep, self.settings.keep_releases)
        except OSError as exc:
            log.warning("could not prune old releases in %s: %s", self.root / release.RELEASES_DIR, exc)
            return
        if removed:
            log.info("pruned %d old release(s): %s", len(removed), ", ".join(p.name for p in removed))

    def start_watching(self) -> None:
        if not self.follows_registry or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="domaintune-registry-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.refresh()
                if self.guard_due() and self.shadow_log_path is not None:
                    self.check_guard(lambda: read_log(self.shadow_log_path),
                                     lambda: feedback_labels(self.root))
            except Exception as exc:  # noqa: BLE001 - a failing poll (git busy, repo moved) must not end watching
                self.last_error = {"version": None, "error": f"registry poll failed: {exc}", "at": time.time(),
                                   "kept": self.current.version if self.current else None}
                log.error("registry poll failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
