"""Teacher clients: one interface for a teacher in this process (CPU or GPU) and one behind an inference server.

Both implement ``bundle.model.Model`` (load, predict logits, ready, close), registered as the kinds a
manifest names (``local``, ``remote``). Serving (the Teacher deployment), evaluation, building and
re-distillation all get teacher answers through ``open_teacher``, so nothing assumes the bundle holds
teacher weights. A ``remote`` teacher speaks the Open
Inference Protocol v2 over REST (MLServer, KServe, Triton): calls are batched, concurrent, time-limited,
retried with backoff, and guarded by a circuit breaker, so when the server is down deferred texts fail at
once (and degrade) instead of each waiting for a timeout.

No Ray, serving or training imports here (import-linter contract of ``bundle``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import numpy as np
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from bundle.model import Model, ThreadedModel, open_model, register
from bundle.registry import MANIFEST, TEACHER_DIR, TOKENIZER_DIR, Manifest, sha256_file
from bundle.teacher_spec import RemoteTeacherSettings, TeacherSpec

__all__ = ["LocalTeacher", "RemoteTeacher", "RemoteTeacherSettings", "TeacherSpec",
           "TeacherUnavailable", "open_teacher", "teacher_logits_sync"]

Device = Literal["cpu", "cuda", "auto"]
TeacherRuntimeKind = Literal["auto", "onnx", "torch"]
PROBABILITY_FLOOR = 1e-12  # log(0) guard when a server answers probabilities


class TeacherUnavailable(RuntimeError):
    """The teacher could not answer (call failed after retries, or the breaker is open); names the URL."""


# -- local ------------------------------------------------------------------------------------------------


def resolve_device(device: Device) -> str:
    """``auto`` is CUDA when PyTorch sees a GPU, else CPU; ``cuda`` without a GPU is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("teacher device `cuda` requested but PyTorch sees no GPU (use `auto` or `cpu`)")
    return device


def _label_order(model_labels: list[str], labels: list[str]) -> list[int]:
    """Columns of the model's output in the bundle's label order; names must match when they are real names."""
    if sorted(model_labels) == sorted(labels):
        return [model_labels.index(label) for label in labels]
    if len(model_labels) == len(labels) and all(name.startswith("LABEL_") for name in model_labels):
        return list(range(len(labels)))  # an unnamed head: its order is the data's order
    raise ValueError(f"teacher labels {model_labels} do not match the bundle's labels {labels}")


def resolve_runtime(runtime: TeacherRuntimeKind, device: str, model_dir: Path) -> Literal["onnx", "torch"]:
    """``auto`` is ONNX Runtime on a CPU when the bundle has the teacher's ONNX export, else PyTorch."""
    from bundle.runtime import TEACHER_ONNX_FILE

    has_onnx = (model_dir / TEACHER_ONNX_FILE).is_file()
    if runtime == "onnx":
        if device != "cpu":
            raise ValueError(f"teacher runtime `onnx` runs on the CPU only, not on device {device!r}")
        if not has_onnx:
            raise FileNotFoundError(f"{model_dir}: no {TEACHER_ONNX_FILE} in this bundle (rebuild it, or use "
                                    "runtime `torch`)")
        return "onnx"
    if runtime == "torch":
        return "torch"
    return "onnx" if has_onnx and device == "cpu" else "torch"


@register("local")
class LocalTeacher(ThreadedModel):
    """The bundle's teacher/ weights on ONNX Runtime or PyTorch, CPU or a GPU; model calls run in a worker thread."""

    def __init__(self, bundle_path: Path, labels: list[str], max_length: int, threads: int = 1,
                 device: Device = "cpu", batch_size: int = 64, runtime: TeacherRuntimeKind = "auto",
                 version: str | None = None) -> None:
        super().__init__()
        self.bundle_path, self.max_length, self.threads = Path(bundle_path), max_length, threads
        self.requested_device, self.requested_runtime = device, runtime
        self.labels, self.batch_size, self.version = list(labels), batch_size, version

    def load(self) -> None:
        """Resolve device and runtime, open the weights, and map the head's labels to the bundle's order."""
        from bundle.runtime import TEACHER_ONNX_FILE, OnnxTeacherRuntime, TeacherRuntime

        bundle_path, max_length, threads, labels = self.bundle_path, self.max_length, self.threads, self.labels
        model_dir = bundle_path / TEACHER_DIR
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no teacher weights in this bundle (is its teacher remote?)")
        # A teacher that brought its own tokenizer (a checkpoint of another family) keeps it.
        tokenizer_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else bundle_path / TOKENIZER_DIR
        self.device = resolve_device(self.requested_device)
        self.runtime_kind = resolve_runtime(self.requested_runtime, self.device, model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        if self.runtime_kind == "onnx":
            self.runtime = OnnxTeacherRuntime(model_dir / TEACHER_ONNX_FILE, tokenizer_dir, max_length, threads,
                                              pad_id=int(config.get("pad_token_id") or 0))
        else:
            self.runtime = TeacherRuntime(model_dir, tokenizer_dir, max_length, threads, device=self.device)
        id2label = {int(k): str(v) for k, v in config.get("id2label", {}).items()}
        self._columns = _label_order([id2label[i] for i in range(len(id2label))], labels)
        self.identity = f"local:{_weights_digest(bundle_path)}:{max_length}"
        super().load()

    def run(self, texts: list[str]) -> np.ndarray:
        """Length-sorted batches: texts of similar length pad little."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            out[chunk] = self.runtime.logits([texts[i] for i in chunk])[:, self._columns]
        return out

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": self.device, "runtime": self.runtime_kind}


def _weights_digest(bundle_path: Path) -> str:
    """The teacher's weights checksum: from the manifest when published, else hashed (a staging folder)."""
    manifest_path = bundle_path / MANIFEST
    names = sorted(p.relative_to(bundle_path).as_posix() for p in (bundle_path / TEACHER_DIR).rglob("*") if p.is_file())
    if manifest_path.is_file():
        files = Manifest.model_validate_json(manifest_path.read_text()).files
        digests = [files.get(name) or sha256_file(bundle_path / name) for name in names]
    else:
        digests = [sha256_file(bundle_path / name) for name in names]
    return hashlib.sha256(json.dumps(list(zip(names, digests, strict=True))).encode()).hexdigest()[:16]


# -- remote -----------------------------------------------------------------------------------------------


class Breaker(Protocol):
    """The circuit breaker a remote teacher reports to (``routing.breaker.CircuitBreaker`` in serving).

    Injected rather than built here: the gateway and the Teacher deployment share one breaker design, and
    bundle/ may not import routing/. Offline callers (build, evaluation) pass none: there a dead server
    should fail the run after its retries, not be skipped.
    """

    @property
    def state(self) -> Any: ...

    @property
    def failures(self) -> int: ...

    def allow(self) -> bool: ...

    def record_success(self) -> None: ...

    def record_failure(self) -> None: ...


class _RetryableError(Exception):
    """A failure worth another try: transport error, timeout, 5xx, 429."""


@register("remote")
class RemoteTeacher:
    """An Open Inference Protocol v2 REST model as the teacher (pooled, batched, bounded, retried, breaker)."""

    def __init__(self, settings: RemoteTeacherSettings, labels: list[str], breaker: Breaker | None = None,
                 version: str | None = None) -> None:
        self.settings, self.version = settings, version
        self.labels = list(labels)
        names = settings.label_names or self.labels
        if settings.output == "tensor":
            self._columns = _label_order(list(names), self.labels)
        self.base = settings.url.rstrip("/")
        self.infer_url = f"{self.base}/v2/models/{settings.model}/infer"
        self.ready_url = f"{self.base}/v2/models/{settings.model}/ready"
        self.identity = "remote:" + hashlib.sha256(settings.model_dump_json(
            include={"url", "model", "output", "output_name", "scores", "input_name", "extra_inputs", "label_names"}
        ).encode()).hexdigest()[:16]
        self.breaker = breaker
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self.last_error: str | None = None

    def load(self) -> None:
        """Nothing to open ahead: the pooled client belongs to the event loop of the first call."""

    def _http(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """One pooled client per event loop (offline callers run a fresh loop per call)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._semaphore is None:
            self._client = httpx.AsyncClient(
                timeout=self.settings.timeout_s,
                limits=httpx.Limits(max_connections=self.settings.max_concurrency,
                                    max_keepalive_connections=self.settings.max_concurrency))
            self._semaphore = asyncio.Semaphore(self.settings.max_concurrency)
            self._loop = loop
        return self._client, self._semaphore

    async def predict(self, texts: list[str]) -> np.ndarray:
        """Logits in the bundle's label order (log-probabilities when the server answers probabilities)."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        size = self.settings.batch_size
        parts = await asyncio.gather(*(self._call(texts[i:i + size]) for i in range(0, len(texts), size)))
        return np.concatenate(parts)

    async def _call(self, texts: list[str]) -> np.ndarray:
        attempts = AsyncRetrying(stop=stop_after_attempt(self.settings.retries + 1),
                                 wait=wait_exponential(multiplier=0.1, max=2.0),
                                 retry=retry_if_exception(lambda exc: isinstance(exc, _RetryableError)
                                                          and self._closed()),
                                 reraise=True)
        try:
            async for attempt in attempts:
                with attempt:
                    return await self._attempt(texts)
        except _RetryableError as exc:
            raise TeacherUnavailable(f"remote teacher {self.infer_url}: {exc}") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(self, texts: list[str]) -> np.ndarray:
        if self.breaker is not None and not self.breaker.allow():
            raise TeacherUnavailable(f"remote teacher {self.infer_url}: circuit breaker open after "
                                     f"{self.breaker.failures} consecutive failures ({self.last_error})")
        client, semaphore = self._http()
        body = {"inputs": [{"name": self.settings.input_name, "datatype": "BYTES", "shape": [len(texts)],
                            "data": texts}, *self.settings.extra_inputs]}
        try:
            async with semaphore:
                response = await client.post(self.infer_url, json=body)
        except httpx.HTTPError as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            raise _RetryableError(self.last_error) from exc
        if response.status_code >= 500 or response.status_code == 429:
            self._failed(f"HTTP {response.status_code}: {response.text[:200]}")
            raise _RetryableError(self.last_error)
        if response.status_code >= 400:
            # The server refused this request (a bad model name or input): no retry, but it counts against
            # the breaker, since every text will be refused the same way.
            self._failed(f"HTTP {response.status_code}: {response.text[:200]}")
            raise TeacherUnavailable(f"remote teacher {self.infer_url}: {self.last_error}")
        try:
            logits = self._parse(response.json(), len(texts))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self._failed(f"unreadable answer: {exc}")
            raise TeacherUnavailable(f"remote teacher {self.infer_url}: {self.last_error}") from exc
        if self.breaker is not None:
            self.breaker.record_success()
        self.last_error = None
        return logits

    def _closed(self) -> bool:
        """Retry only while the breaker (if any) is closed: an open one means the server is known down."""
        return self.breaker is None or str(self.breaker.state) == "closed"

    def _failed(self, error: str) -> None:
        self.last_error = error
        if self.breaker is not None:
            self.breaker.record_failure()

    def _parse(self, answer: dict[str, Any], n: int) -> np.ndarray:
        outputs = answer["outputs"]
        name = self.settings.output_name
        output = next((o for o in outputs if o["name"] == name), None) if name else outputs[0]
        if output is None:
            raise ValueError(f"no output named {name!r} (outputs: {[o['name'] for o in outputs]})")
        if self.settings.output == "tensor":
            scores = np.asarray(output["data"], dtype=np.float64).reshape(n, -1)
            if scores.shape[1] != len(self._columns):
                raise ValueError(f"output {output['name']!r} has {scores.shape[1]} columns, expected "
                                 f"{len(self._columns)} labels")
            scores = scores[:, self._columns]
            if self.settings.scores == "probabilities":
                scores = np.log(np.clip(scores, PROBABILITY_FLOOR, None))
            return scores.astype(np.float32)
        return self._parse_label_lists(output["data"], n)

    def _parse_label_lists(self, data: list[Any], n: int) -> np.ndarray:
        """Per-text ``[{label, score}, ...]`` (JSON strings or objects) -> log-probabilities by label name.

        A server that answers only its top label leaves the other labels' share of the remaining probability
        mass unknown: it is spread evenly over them.
        """
        rows = [json.loads(item) if isinstance(item, str | bytes) else item for item in data]
        if len(rows) != n:
            raise ValueError(f"{len(rows)} answers for {n} texts")
        out = np.zeros((n, len(self.labels)), dtype=np.float64)
        index = {label: i for i, label in enumerate(self.labels)}
        for r, row in enumerate(rows):
            entries = row if isinstance(row, list) else [row]
            seen = np.zeros(len(self.labels), dtype=bool)
            for entry in entries:
                label = str(entry["label"])
                if label not in index:
                    raise ValueError(f"label {label!r} is not one of the bundle's labels {self.labels}")
                out[r, index[label]] = float(entry["score"])
                seen[index[label]] = True
            if not seen.all():
                out[r, ~seen] = max(0.0, 1.0 - out[r, seen].sum()) / (~seen).sum()
        return np.log(np.clip(out, PROBABILITY_FLOOR, None)).astype(np.float32)

    async def ready(self) -> bool:
        """The server says the model is ready (OIP ``/v2/models/{model}/ready``); never raises."""
        try:
            client, _ = self._http()
            response = await client.get(self.ready_url, timeout=min(self.settings.timeout_s, 2.0))
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client, self._loop, self._semaphore = None, None, None

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.base, "model": self.settings.model,
                "breaker": None if self.breaker is None else str(self.breaker.state),
                "consecutive_failures": None if self.breaker is None else self.breaker.failures,
                "last_error": self.last_error}


# -- opening and offline use ------------------------------------------------------------------------------


def open_teacher(spec: TeacherSpec, bundle_path: Path, labels: list[str], *, max_length: int | None = None,
                 threads: int = 1, device: Device = "cpu", remote_url: str | None = None,
                 breaker: Breaker | None = None, runtime: TeacherRuntimeKind = "auto",
                 version: str | None = None) -> Model:
    """The teacher a bundle (or a build's staging folder) names. ``remote_url`` overrides the recorded URL
    (a deployment that reaches the same server under another name)."""
    if spec.kind == "remote":
        assert spec.remote is not None
        settings = spec.remote if remote_url is None else spec.remote.model_copy(update={"url": remote_url})
        return open_model("remote", settings, labels, breaker, version)
    if max_length is None:
        manifest_path = Path(bundle_path) / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{bundle_path}: no manifest to take max_length from; pass max_length")
        max_length = Manifest.model_validate_json(manifest_path.read_text()).max_length
    return open_model("local", Path(bundle_path), labels, max_length, threads, device, runtime=runtime,
                      version=version)


class _LogitCache:
    """Teacher answers on disk, keyed by sha256(teacher identity + text): one SQLite file, safe to share."""

    def __init__(self, cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(cache_dir / "teacher_logits.sqlite", timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS logits (key TEXT PRIMARY KEY, row BLOB NOT NULL)")

    @staticmethod
    def key(identity: str, text: str) -> str:
        return hashlib.sha256(f"{identity}\0{text}".encode()).hexdigest()

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for key, row in self.db.execute(f"SELECT key, row FROM logits WHERE key IN ({marks})", chunk):
                found[key] = np.frombuffer(row, dtype=np.float32)
        return found

    def put(self, rows: dict[str, np.ndarray]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO logits VALUES (?, ?)",
                                [(key, np.asarray(row, dtype=np.float32).tobytes()) for key, row in rows.items()])

    def close(self) -> None:
        self.db.close()


def teacher_logits_sync(client: Model, texts: list[str], cache_dir: Path | None = None) -> np.ndarray:
    """Teacher logits for offline work (build, eval, re-distillation), from the disk cache where answered before.

    Runs the async client to completion on a fresh event loop (call it from synchronous code only).
    """
    cache = _LogitCache(Path(cache_dir)) if cache_dir is not None else None
    try:
        keys = [_LogitCache.key(client.identity, text) for text in texts]
        known = cache.get(keys) if cache is not None else {}
        missing = list(dict.fromkeys(text for text, key in zip(texts, keys, strict=True) if key not in known))
        if missing:
            async def ask() -> np.ndarray:
                try:
                    return await client.predict(missing)
                finally:
                    await client.close()

            answered = asyncio.run(ask())
            fresh = {_LogitCache.key(client.identity, text): row for text, row in zip(missing, answered, strict=True)}
            if cache is not None:
                cache.put(fresh)
            known = {**known, **fresh}
        if not texts:
            return np.zeros((0, len(client.labels)), dtype=np.float32)
        return np.stack([known[key] for key in keys]).astype(np.float32)
    finally:
        if cache is not None:
            cache.close()
