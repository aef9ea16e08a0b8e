"""The models being served, and hot reload: validate -> build beside the old -> smoke-test -> swap -> drain.

`Registry.snapshot` is one immutable dict {model_name: ServedModel}; a reload builds every new or changed model
first, smoke-tests each with a one-token generation, then replaces the whole dict in one assignment. A request keeps
the engine it was admitted to; old engines drain (finish in-flight, take nothing new) on a background thread and
then free their memory. Any failure before the swap leaves the old snapshot serving and is reported.

Two ways in: the infer TOML changing on disk (`watch`, watchfiles on the `infer/` folder, since editors save by
renaming a temp file over the original) and the admin call (`admin_reload`), which edits the TOML's raw tables and
writes the file back atomically (secrets in the file stay; requests never carry any).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from rwkv_app.config import InferConfig, InferModelConfig, parse_infer, read_toml
from rwkv_app.errors import UserError
from rwkv_app.fileio import atomic_write_text
from rwkv_app.infer.engine import Engine, EngineClosed, GenerationRequest, QueueFull, RequestHandle

log = logging.getLogger(__name__)

SMOKE_TIMEOUT_S = 300.0  # a first CUDA step may compile kernels
PATH_KEYS = ("weights_path", "tokenizer_vocab_path", "model_cfg")


# --------------------------------------------------------------------------------------------------------- models


def resolve_device(entry: InferModelConfig) -> tuple[list[torch.device], torch.dtype]:
    """Devices of the replicas (one per `device_ids` entry) and the weights dtype, from `device_type`/`precision`."""
    kind = entry.device_type
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"model `{entry.model_name}`: device_type = \"cuda\" but this machine has no CUDA device")
        count = torch.cuda.device_count()
        bad = [i for i in entry.device_ids if not 0 <= i < count]
        if bad:
            raise UserError(f"model `{entry.model_name}`: device_ids {bad} do not exist (this machine has {count} GPUs)")
        devices = [torch.device("cuda", i) for i in entry.device_ids]
    else:
        devices = [torch.device("cpu") for _ in entry.device_ids]  # CPU replicas share the cores
    precision = entry.precision
    if precision == "auto":
        precision = "bf16" if kind == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return devices, dtype


def load_tokenizer_for(entry: InferModelConfig):
    from rwkv_app.tokenizer import load_tokenizer

    if entry.tokenizer_vocab_path is None:
        return load_tokenizer("world")
    return load_tokenizer("generic", entry.tokenizer_vocab_path)


def precheck(entries: list[InferModelConfig]) -> None:
    """The cheap checks, before loading anything: files exist, devices exist."""
    for entry in entries:
        for key in ("weights_path", "tokenizer_vocab_path"):
            path = getattr(entry, key)
            if path and not Path(path).is_file():
                raise UserError(f"model `{entry.model_name}`: `{key}` file not found: {path}")
        resolve_device(entry)


class ServedModel:
    """One `[[models]]` entry: its tokenizer and one engine per replica."""

    def __init__(self, entry: InferModelConfig, tokenizer, engines: list[Engine], fingerprint: str):
        self.entry, self.tokenizer, self.engines, self.fingerprint = entry, tokenizer, engines, fingerprint
        self.name = entry.model_name
        self.created = int(time.time())

    @classmethod
    def build(cls, entry: InferModelConfig, max_queued: int, fingerprint: str = "") -> "ServedModel":
        """Load weights on every replica's device, start the engines and smoke-test each; UserError if anything fails."""
        from rwkv_app.model.checkpoint import load_model

        devices, dtype = resolve_device(entry)
        try:
            tokenizer = load_tokenizer_for(entry)
        except UserError as e:
            raise UserError(f"model `{entry.model_name}`: {e}") from None
        if tokenizer.vocab_size > entry.arch.vocab_size:
            raise UserError(f"model `{entry.model_name}`: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                            f"only {entry.arch.vocab_size} (vocab_size)")
        engines: list[Engine] = []
        try:
            for i, device in enumerate(devices):
                started = time.perf_counter()
                try:
                    model = load_model(entry.weights_path, device, dtype, expect=entry.arch)
                except UserError as e:
                    raise UserError(f"model `{entry.model_name}`: {e}") from None
                log.info("model `%s`: %s loaded onto %s in %.1f s", entry.model_name, entry.weights_path, device,
                         time.perf_counter() - started)
                model.eval()
                engine = Engine(model, entry.arch, tokenizer, max_batch_size=entry.max_batch_size,
                                max_context_len=entry.max_context_len, paragraph_len=entry.paragraph_len,
                                decode_first=entry.decode_first, max_queued=max_queued,
                                cuda_graphs=entry.cuda_graphs, torch_compile=entry.torch_compile,
                                name=f"{entry.model_name}#{i}").start()
                engines.append(engine)
                try:
                    engine.generate([0], 1, timeout=SMOKE_TIMEOUT_S)
                except Exception as e:
                    raise UserError(f"model `{entry.model_name}`: smoke test on {device} failed: {e}") from None
                log.info("model `%s`: ready on %s, %.1f s after its load began", entry.model_name, device,
                         time.perf_counter() - started)
        except BaseException:
            for engine in engines:
                engine.close(timeout=0)
            raise
        return cls(entry, tokenizer, engines, fingerprint)

    def submit(self, request: GenerationRequest, loop: Optional[asyncio.AbstractEventLoop] = None,
               event: Optional[asyncio.Event] = None) -> RequestHandle:
        """To the least loaded live replica. QueueFull when all are full; EngineClosed when none takes work."""
        full = False
        for engine in sorted((e for e in self.engines if e.alive), key=lambda e: e.load):
            try:
                return engine.submit(request, loop, event)
            except QueueFull:
                full = True
            except EngineClosed:
                continue
        raise QueueFull(self.name) if full else EngineClosed(self.name)

    @property
    def healthy(self) -> bool:
        return all(e.alive for e in self.engines)

    def close(self, timeout: Optional[float] = None) -> None:
        for engine in self.engines:
            engine.drain()
        for engine in self.engines:
            engine.close(timeout)


def fingerprint(entry: InferModelConfig) -> str:
    """What decides whether a model must be rebuilt: its settings and the files (by size and time) it loads."""
    h = hashlib.sha256(entry.model_dump_json().encode())
    for path in (entry.weights_path, entry.tokenizer_vocab_path):
        if path:
            try:
                st = Path(path).stat()
                h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{path}:missing".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------- registry


@dataclass
class ReloadResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dry_run: bool = False
    applied: bool = False

    def as_dict(self) -> dict:
        return {"added": self.added, "removed": self.removed, "changed": self.changed, "unchanged": self.unchanged,
                "dry_run": self.dry_run, "applied": self.applied}


class Registry:
    """The served snapshot, the live server settings, and the reload machinery for one infer TOML."""

    def __init__(self, config: InferConfig, toml_path: Path, config_dir: Path):
        self.config = config
        self.toml_path = Path(toml_path).resolve()
        self.config_dir = Path(config_dir).resolve()
        self.snapshot: dict[str, ServedModel] = {}
        self.ready = False
        self.loading_error: Optional[str] = None
        self.last_reload: dict[str, Any] = {"ok": None, "error": None, "at": None, "source": None}
        self.reloads = {"ok": 0, "failed": 0}
        self._file_hash = _hash_file(self.toml_path)
        self._lock = threading.RLock()  # one reload (and one read-modify-write of the file) at a time

    # ---- serving
    def get(self, name: str) -> Optional[ServedModel]:
        return self.snapshot.get(name)

    @property
    def healthy(self) -> bool:
        return self.ready and bool(self.snapshot) and all(m.healthy for m in self.snapshot.values())

    # ---- lifecycle
    def load_initial(self) -> None:
        """Build every model of the config (blocking). A failure is a UserError and nothing is served."""
        with self._lock:
            built: dict[str, ServedModel] = {}
            try:
                for entry in self.config.models:
                    built[entry.model_name] = ServedModel.build(entry, self.config.max_queued_requests,
                                                                fingerprint(entry))
            except BaseException as e:
                for m in built.values():
                    m.close(timeout=0)
                self.loading_error = str(e)
                raise
            self.snapshot = built
            self.ready = True
        freeze_long_lived()

    def close(self, timeout: Optional[float] = None) -> None:
        models, self.snapshot = list(self.snapshot.values()), {}
        self.ready = False
        for m in models:
            m.close(timeout)

    # ---- reload
    def diff(self, new: InferConfig) -> ReloadResult:
        result = ReloadResult()
        new_names = {m.model_name for m in new.models}
        for entry in new.models:
            old = self.snapshot.get(entry.model_name)
            if old is None:
                result.added.append(entry.model_name)
            elif old.fingerprint != fingerprint(entry):
                result.changed.append(entry.model_name)
            else:
                result.unchanged.append(entry.model_name)
        result.removed = sorted(n for n in self.snapshot if n not in new_names)
        return result

    def apply(self, new: InferConfig, dry_run: bool = False, source: str = "admin") -> ReloadResult:
        """Validate, build, smoke-test and swap (blocking; run it off the event loop). UserError keeps the old models."""
        with self._lock:
            try:
                result = self._apply_locked(new, dry_run)
            except Exception as e:
                if not dry_run:
                    self._record(False, str(e), source)
                raise
            if not dry_run:
                self._record(True, None, source)
            return result

    def _apply_locked(self, new: InferConfig, dry_run: bool) -> ReloadResult:
        result = self.diff(new)
        result.dry_run = dry_run
        precheck([m for m in new.models if m.model_name in result.added + result.changed])
        if dry_run:
            return result
        if new.http_bind_addr != self.config.http_bind_addr:
            log.warning("http_bind_addr changed to %s: it takes effect at the next start", new.http_bind_addr)
        built: dict[str, ServedModel] = {}
        try:
            for name in result.added + result.changed:
                entry = new.model_named(name)
                built[name] = ServedModel.build(entry, new.max_queued_requests, fingerprint(entry))  # type: ignore[arg-type]
        except BaseException:
            for m in built.values():
                m.close(timeout=0)
            raise
        old = self.snapshot
        snapshot = {m.model_name: built.get(m.model_name) or old[m.model_name] for m in new.models}
        for name in result.unchanged:  # settings that need no rebuild still follow the file
            for engine in snapshot[name].engines:
                engine.max_queued = new.max_queued_requests
        self.snapshot, self.config = snapshot, new  # the swap
        if result.changed or result.removed:
            # Popped out of the old snapshot into a list only the drain thread holds: its final collection must find
            # them unreachable, so no reference may stay here (they would stay frozen, never freed).
            threading.Thread(target=_drain_all, args=([old.pop(n) for n in result.changed + result.removed],
                                                      new.shutdown_grace_s), daemon=True, name="rwkv-drain").start()
        del old
        result.applied = True
        log.info("reloaded models: %s", result.as_dict())
        freeze_long_lived()
        return result

    def _record(self, ok: bool, error: Optional[str], source: str) -> None:
        self.reloads["ok" if ok else "failed"] += 1
        self.last_reload = {"ok": ok, "error": error, "at": time.time(), "source": source}
        if not ok:
            log.error("reload (%s) failed, the previous models keep serving: %s", source, error)

    # ---- the file on disk
    def reload_from_disk(self) -> Optional[ReloadResult]:
        """The watcher's entry: None when the file's bytes did not change since the last load or write."""
        with self._lock:
            return self._reload_from_disk_locked()

    def _reload_from_disk_locked(self) -> Optional[ReloadResult]:
        digest = _hash_file(self.toml_path)
        if digest is None or digest == self._file_hash:
            return None
        self._file_hash = digest
        try:
            new = parse_infer(read_toml(self.toml_path, self._shown), self.toml_path, self.config_dir)
        except UserError as e:
            self._record(False, str(e), "file")
            raise
        return self.apply(new, source="file")

    def admin_reload(self, upsert: list[dict], remove: list[str], dry_run: bool) -> ReloadResult:
        """rwkv-rs's admin reload on the TOML's raw tables; the file is rewritten atomically once the swap succeeded."""
        with self._lock:
            return self._admin_reload_locked(upsert, remove, dry_run)

    def _admin_reload_locked(self, upsert: list[dict], remove: list[str], dry_run: bool) -> ReloadResult:
        raw = read_toml(self.toml_path, self._shown)
        raw_models = [m for m in raw.get("models", []) if isinstance(m, dict)]
        trusted = {k: {m[k] for m in raw_models if isinstance(m.get(k), str)} for k in PATH_KEYS}
        names = [m.get("model_name") for m in raw_models]
        unknown = [n for n in remove if n not in names]
        if unknown:
            raise UserError(f"remove_model_names: no model named {', '.join(map(repr, unknown))} in {self._shown}")
        new_models = [m for m in raw_models if m.get("model_name") not in remove]
        for i, entry in enumerate(upsert):
            if not isinstance(entry, dict) or not isinstance(entry.get("model_name"), str):
                raise UserError(f"upsert #{i + 1}: each entry needs a `model_name` string")
            self._confine_paths(entry, trusted, f"upsert #{i + 1}")
            at = next((j for j, m in enumerate(new_models) if m.get("model_name") == entry["model_name"]), None)
            if at is None:
                new_models.append(entry)
            else:
                new_models[at] = entry
        new_raw = dict(raw)
        new_raw["models"] = new_models
        new = parse_infer(copy.deepcopy(new_raw), self.toml_path, self.config_dir)
        result = self.apply(new, dry_run=dry_run, source="admin")
        if not dry_run:
            import tomli_w

            text = tomli_w.dumps(new_raw)
            atomic_write_text(self.toml_path, text)
            self._file_hash = hashlib.sha256(text.encode()).hexdigest()  # the watcher must not reload our own write
        return result

    def _confine_paths(self, entry: dict, trusted: dict[str, set], where: str) -> None:
        """Admin bodies may only name files inside the config directory (or paths the file itself already names)."""
        for key in PATH_KEYS:
            value = entry.get(key)
            if not isinstance(value, str) or value in trusted[key]:
                continue
            if key == "model_cfg" and "/" not in value and not value.endswith(".toml"):
                continue  # a bare name in config/model/
            if Path(value).is_absolute() or value.startswith("~"):
                raise UserError(f"{where}: `{key}` must be a path relative to {self._shown} (got {value!r})")
            resolved = (self.toml_path.parent / value).resolve()
            if not resolved.is_relative_to(self.config_dir):
                raise UserError(f"{where}: `{key}` = {value!r} points outside the config directory")

    @property
    def _shown(self) -> str:
        try:
            return str(self.toml_path.relative_to(self.config_dir))
        except ValueError:
            return str(self.toml_path)

    async def watch(self, debounce_ms: int = 300, stop_event: Optional[asyncio.Event] = None) -> None:
        """Reload whenever the TOML changes on disk (watching its folder catches rename-over saves)."""
        from watchfiles import awatch

        folder, name = self.toml_path.parent, self.toml_path.name
        async for changes in awatch(folder, debounce=debounce_ms, step=50, stop_event=stop_event,
                                    recursive=False):
            if not any(Path(p).name == name for _, p in changes):
                continue
            try:
                result = await asyncio.to_thread(self.reload_from_disk)
            except UserError:
                continue  # recorded and logged; the old models keep serving
            except Exception as e:  # a bug must not kill the watcher
                log.exception("reload from %s failed", self._shown)
                self._record(False, f"{type(e).__name__}: {e}", "file")
                continue
            if result is not None:
                log.info("%s changed: %s", self._shown, result.as_dict())


def _drain_all(models: list[ServedModel], grace_s: float) -> None:
    while models:  # emptied as it goes: the thread holds this list until it ends
        model = models.pop()
        model.close(timeout=max(grace_s, 1.0) * 10)  # in-flight requests finish; their clients are still reading
        del model
    freeze_long_lived()  # the retired models were frozen with the rest: collect them now


def freeze_long_lived() -> None:
    """Take every object alive now (weights, tokenizer tables, engines, compiled code) out of the cyclic garbage
    collector's reach, after collecting what is garbage already.

    Serving makes a few small objects per token, so collections run often, and each older-generation collection
    walked the whole heap of long-lived objects: with the World vocab loaded, an engine's host work per generated
    token went from 12.4 to 3.1 µs once they were frozen (benchmarks/RESULTS.md). Called after every load and
    reload; plain reference counting still frees whatever is dropped later."""
    with _FREEZING:  # a reload's call and its drain thread's may meet: the second one's collect would do nothing
        gc.unfreeze()
        _collect_for_sure()
        gc.freeze()


_FREEZING = threading.Lock()


def _collect_for_sure(tries: int = 400) -> None:
    """A full collection that really ran. `gc.collect()` returns at once, collecting nothing, while another thread's
    collection is under way (paused in a finalizer that let go of the interpreter lock); whatever it missed, the
    freeze after it would keep for good: a retired model's weights never freed."""
    for _ in range(tries):
        done = gc.get_stats()[2]["collections"]
        gc.collect()
        if gc.get_stats()[2]["collections"] > done:
            return
        time.sleep(0.005)
    log.warning("the garbage collector stayed busy for %.0f s: retired objects may stay in memory", tries * 0.005)


def _hash_file(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
