"""analyze(source) -> Analysis: one row of spectral metrics per weight matrix (or expert)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from kappatune.analysis import linalg, memory, metrics, names
from kappatune.analysis.cache import Matrix, SpectrumCache, rows_problem
from kappatune.analysis.options import AnalyzeOptions
from kappatune.analysis.source_base import RowStreamingSource, Source, TensorEntry, streamed_digest
from kappatune.analysis.sources import open_source
from kappatune.errors import KappaTuneError
from kappatune.jsonio import (
    atomic_write_json,
    check_schema,
    decode_float,
    encode_float,
    fields_json,
    read_json_object,
)
from kappatune.settings import name_matches

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: rows carry Spectrum's SNR (``snr``); 1 is read with snr None
READABLE_SCHEMAS = (1, 2)
STREAM_MIN_BYTES = 64 * 1024 * 1024
_FLOAT_FIELDS = metrics.METRIC_FIELDS
KAPPA_FIELDS = ("kappa", "sigma_max", "sigma_min")
_NON_FLOAT_DTYPES = re.compile(r"^(u?int\d+|bool)$")
ProgressHook = Callable[[int, int], None]


@dataclass(frozen=True)
class SpectrumRow:
    """Spectral metrics of one matrix: a 2-D weight, a reshaped kernel, or one expert."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    expert: int | None
    kappa: float
    sigma_max: float
    sigma_min: float
    log_volume: float
    entropy_deficit: float
    stable_rank: float
    effective_rank: float
    layer: int | None
    module_type: str
    method: str
    # Spectrum's SNR (metrics.spectrum_snr): nan where the noise edge is undefined (1 x N),
    # None where it was not computed (analyses of schema 1, rows built by hand)
    snr: float | None = None
    kappa_only: bool = False  # True: only KAPPA_FIELDS are known, the others are nan (null)

    @property
    def key(self) -> tuple[str, int]:
        """Sort/identity key: (name, expert) with -1 for whole tensors."""
        return (self.name, -1 if self.expert is None else self.expert)

    def to_json(self) -> dict[str, Any]:
        d = fields_json(self, _FLOAT_FIELDS)
        d["shape"] = list(self.shape)
        d["snr"] = None if self.snr is None else encode_float(self.snr)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], schema_version: int = SCHEMA_VERSION) -> SpectrumRow:
        name = str(d["name"])
        snr = None if schema_version < 2 else decode_float(d["snr"])
        return cls(
            name=name,
            shape=tuple(int(x) for x in d["shape"]),
            dtype=str(d["dtype"]),
            numel=int(d["numel"]),
            expert=None if d.get("expert") is None else int(d["expert"]),
            layer=d.get("layer", names.layer_index(name)),
            module_type=str(d.get("module_type") or names.module_type(name)),
            method=str(d.get("method", "")),
            snr=snr,
            kappa_only=bool(d.get("kappa_only", False)),
            **{f: decode_float(d[f]) for f in _FLOAT_FIELDS},
        )


@dataclass(frozen=True)
class SkippedRow:
    name: str
    shape: tuple[int, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "reason": self.reason}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SkippedRow:
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d["reason"]))


@dataclass(frozen=True)
class Analysis:
    """The result of analysing one source: rows in checkpoint order, plus what was skipped."""

    source: str
    fingerprint: str
    tensors: tuple[SpectrumRow, ...]
    skipped: tuple[SkippedRow, ...] = ()
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "tensors": [r.to_json() for r in self.tensors],
            "skipped": [s.to_json() for s in self.skipped],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Analysis:
        version = check_schema(d, "analysis", READABLE_SCHEMAS)
        for key in ("tensors", "skipped"):
            if not isinstance(d.get(key), list):
                raise KappaTuneError(f"malformed analysis JSON: {key!r} is not a list")
        try:
            return cls(
                source=str(d["source"]),
                fingerprint=str(d["fingerprint"]),
                tensors=tuple(
                    _loaded(lambda x: SpectrumRow.from_json(x, version), "tensors", i, r)
                    for i, r in enumerate(d["tensors"])
                ),
                skipped=tuple(
                    _loaded(SkippedRow.from_json, "skipped", i, s, full=False)
                    for i, s in enumerate(d["skipped"])
                ),
                schema_version=version,
            )
        except KappaTuneError:
            raise  # already names the row
        except KeyError as exc:
            raise KappaTuneError(f"malformed analysis JSON: no {exc}") from None
        except (TypeError, ValueError, OverflowError) as exc:
            from kappatune.errors import one_line

            raise KappaTuneError(f"malformed analysis JSON: {one_line(str(exc))}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Analysis:
        return cls.from_json(read_json_object(path, "analysis", "no such file"))

    def row(self, name: str, expert: int | None = None) -> SpectrumRow:
        for r in self.tensors:
            if r.name == name and r.expert == expert:
                return r
        raise KeyError((name, expert))


# --------------------------------------------------------------------------- row validation

_MAX_COUNT = 2**62  # no dimension or element count of a real tensor comes near this
_NONNEGATIVE = ("sigma_max", "sigma_min", "stable_rank", "effective_rank")
_Row = TypeVar("_Row", "SpectrumRow", "SkippedRow")


def _loaded(
    load: Callable[[Mapping[str, Any]], _Row], section: str, index: int, row: Any, full: bool = True
) -> _Row:
    """``load(row)`` after :func:`check_row_json`; errors name the row."""
    name = row.get("name") if isinstance(row, dict) else None
    where = f"{section}[{index}]" + (f" ({name})" if isinstance(name, str) else "")
    try:
        check_row_json(row, full=full)
        return load(row)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        problem = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise KappaTuneError(f"malformed analysis JSON: {where}: {problem}") from None


def _count(value: Any, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_COUNT:
        raise ValueError(f"{what} must be a whole number >= {low}, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    """A float field as written by :func:`encode_float`: a number, "inf"/"-inf" or null."""
    if value is None or value in ("inf", "-inf"):
        return decode_float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f'{what} must be a number, "inf" or null, got {value!r}')
    return float(value)


def check_row_json(row: Any, full: bool = True) -> None:
    """Raise ValueError unless ``row`` is a well-typed analysis row with values in range
    (``full``: a :class:`SpectrumRow`, else a :class:`SkippedRow`)."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if not isinstance(row["name"], str) or not row["name"]:
        raise ValueError(f"name must be a non-empty string, got {row['name']!r}")
    shape = row["shape"]
    if not isinstance(shape, list):
        raise ValueError(f"shape must be a list, got {shape!r}")
    dims = [_count(x, "each dimension of shape") for x in shape]
    if not full:
        if not isinstance(row["reason"], str):
            raise ValueError("reason must be a string")
        return
    for key in ("dtype", "module_type", "method"):
        if key in row and not isinstance(row[key], str | None):
            raise ValueError(f"{key} must be a string, got {row[key]!r}")
    numel = _count(row["numel"], "numel", 1)
    allowed = {math.prod(dims)}
    if row.get("expert") is not None and len(dims) == 3:
        allowed.add(math.prod(dims[1:]))  # an expert's row of a stacked tensor
    if numel not in allowed:
        raise ValueError(f"numel {numel} contradicts shape {dims} ({math.prod(dims)} elements)")
    for key in ("expert", "layer"):
        if row.get(key) is not None:
            _count(row[key], key)
    values = {f: _number(row[f], f) for f in _FLOAT_FIELDS}
    if not (math.isnan(values["kappa"]) or values["kappa"] >= 1):
        raise ValueError(f"kappa must be >= 1 or null, got {row['kappa']!r}")
    for f in _NONNEGATIVE:
        if values[f] < 0:
            raise ValueError(f"{f} must be >= 0 or null, got {row[f]!r}")


# --------------------------------------------------------------------------- planning


def _skip_reason(entry: TensorEntry, options: AnalyzeOptions) -> str | None:
    if len(entry.shape) < 2:
        return f"not a matrix ({len(entry.shape)}-D)"
    if entry.numel == 0:
        return "empty tensor (0 elements; a ZeRO-3 partitioned parameter?)"
    if entry.unreadable:
        return entry.unreadable
    if _NON_FLOAT_DTYPES.match(entry.dtype):
        if (
            names.module_type(entry.name) != entry.name.rsplit(".", 1)[-1]
            or "qweight" in entry.name
        ):
            return f"integer dtype {entry.dtype} (packed quantized weights: dequantize first)"
        return f"integer dtype {entry.dtype} (not floating-point weights)"
    if options.include and not name_matches(options.include, entry.name, "--include"):
        return "not matched by --include"
    if options.exclude and name_matches(options.exclude, entry.name, "--exclude"):
        return "matched by --exclude"
    if options.max_dim is not None:
        dims = (
            entry.shape[-2:]
            if names.is_fused_experts(entry.name, len(entry.shape))
            else entry.shape
        )
        if max(dims) > options.max_dim:
            return f"a dimension exceeds --max-dim {options.max_dim}"
    return None


def _layout(entry: TensorEntry) -> str:
    if names.is_fused_experts(entry.name, len(entry.shape)):
        return "experts"
    return "matrix" if len(entry.shape) == 2 else "kernel"


def _matrices(entry: TensorEntry, t: torch.Tensor) -> list[tuple[int | None, torch.Tensor]]:
    if _layout(entry) == "experts":
        return [(e, t[e]) for e in range(t.shape[0])]
    return [(None, linalg.as_matrix(t))]


def _metric_rows(
    entry: TensorEntry,
    t: torch.Tensor,
    device: torch.device,
    options: AnalyzeOptions,
    block_rows: int,
) -> list[dict[str, Any]] | str:
    """Cached payload for one tensor: per-matrix metrics, or a skip reason."""
    mats = _matrices(entry, t)
    results = linalg.batch_spectra(
        [m for _, m in mats],
        block_rows=block_rows,
        device=device,
        kappa_only=options.kappa_only,
    )
    rows: list[dict[str, Any]] = []
    for (expert, m), res in zip(mats, results, strict=True):
        if isinstance(res, linalg.NonFiniteMatrix):
            where = f" in expert {expert}" if expert is not None else ""
            return f"{res}{where}"
        rows.append(_payload_row(expert, tuple(m.shape), res))
    return rows


def _payload_row(
    expert: int | None, shape: tuple[int, ...], res: linalg.SpectrumResult
) -> dict[str, Any]:
    summary = metrics.summarize(res.singular_values)
    row: dict[str, Any] = {k: encode_float(v) for k, v in asdict(summary).items()}
    if not res.complete:  # only the extremes are known: the other metrics are undefined
        row = {k: (v if k in KAPPA_FIELDS else None) for k, v in row.items()}
    numel = int(shape[0]) * int(shape[1])
    snr = metrics.spectrum_snr(res.singular_values, int(shape[0]), int(shape[1]))
    row.update(expert=expert, shape=list(shape), numel=numel, method=res.method)
    # the SNR needs every singular value: undefined (null) on the kappa-only route
    row["snr"] = encode_float(snr) if res.complete else None
    row["kappa_only"] = not res.complete
    return row


def _streamable(src: Source, entry: TensorEntry) -> bool:
    """Large tall 2-D tensors are read in row chunks so memory does not grow with the height."""
    return (
        isinstance(src, RowStreamingSource)
        and len(entry.shape) == 2
        and entry.shape[0] >= entry.shape[1]
        and entry.numel * 4 >= STREAM_MIN_BYTES
    )


def _streamed_rows(
    src: RowStreamingSource,
    entry: TensorEntry,
    device: torch.device,
    options: AnalyzeOptions,
    block_rows: int,
) -> list[dict[str, Any]] | str:
    def blocks(rows: int) -> Iterator[torch.Tensor]:
        for _, t in src.row_chunks(entry, rows, decode=True):
            assert t is not None
            yield t

    shape = (int(entry.shape[0]), int(entry.shape[1]))
    try:
        res = linalg.spectrum_of_blocks(
            blocks,
            shape,
            block_rows=block_rows,
            device=device,
            kappa_only=options.kappa_only,
        )
    except linalg.NonFiniteMatrix as exc:
        return str(exc)
    return [_payload_row(None, shape, res)]


def _to_rows(entry: TensorEntry, payload: list[dict[str, Any]]) -> list[SpectrumRow]:
    out = []
    for p in payload:
        shape = tuple(p["shape"]) if p["expert"] is not None else entry.shape
        out.append(
            SpectrumRow(
                name=entry.name,
                shape=tuple(int(x) for x in shape),
                dtype=entry.dtype,
                numel=int(p["numel"]),
                expert=p["expert"],
                layer=names.layer_index(entry.name),
                module_type=names.module_type(entry.name),
                method=str(p["method"]),
                snr=None if p.get("kappa_only") else decode_float(p["snr"]),
                kappa_only=bool(p.get("kappa_only", False)),
                **{f: decode_float(p[f]) for f in _FLOAT_FIELDS},
            )
        )
    return out


class _ByteBudget:
    """Bounds the bytes of tensors held by concurrent workers."""

    def __init__(self, limit: int) -> None:
        self._limit, self._used = limit, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self._limit)
        with self._cond:
            self._cond.wait_for(lambda: self._used + nbytes <= self._limit)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


def _blas_single_thread(workers: int) -> AbstractContextManager[object]:
    if workers <= 1:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class Plan:
    """What an analysis will look at: every entry, the candidates, and what is skipped up front."""

    source: Source
    entries: tuple[TensorEntry, ...]
    candidates: tuple[TensorEntry, ...]
    skipped: tuple[SkippedRow, ...]
    stats: Mapping[Path, tuple[int, ...]] = field(default_factory=dict)  # before any read


Payload = list[dict[str, Any]] | str  # metric rows of one tensor, or the reason it was skipped
Computed = dict[str, tuple[str, Payload]]  # tensor name -> (content digest, payload)


def plan(
    source: str | os.PathLike[str] | Source | torch.nn.Module | Mapping[str, torch.Tensor],
    options: AnalyzeOptions,
) -> Plan:
    src = source if isinstance(source, Source) else open_source(source)
    entries = tuple(src.entries())
    skipped, candidates = [], []
    for e in entries:
        reason = _skip_reason(e, options)
        if reason:
            skipped.append(SkippedRow(e.name, e.shape, reason))
        else:
            candidates.append(e)
    return Plan(src, entries, tuple(candidates), tuple(skipped), _stats(src.files()))


def _stats(files: Sequence[Path]) -> dict[Path, tuple[int, ...]]:
    out = {}
    for f in files:
        try:
            out[f] = SpectrumCache.stat_key(f)
        except OSError:
            continue
    return out


def _expected_matrices(entry: TensorEntry) -> list[Matrix]:
    """The matrices an entry's cached rows describe, in order."""
    if _layout(entry) == "experts":
        rows, cols = entry.shape[-2:]
        return [(e, (rows, cols)) for e in range(entry.shape[0])]
    return [(None, linalg_shape(entry.shape))]


def _matrix_shape(entry: TensorEntry) -> tuple[int, int]:
    """The shape of each matrix the tensor holds (one expert's, for fused experts)."""
    if _layout(entry) == "experts":
        return (int(entry.shape[-2]), int(entry.shape[-1]))
    return linalg_shape(entry.shape)


def matrix_cost(entry: TensorEntry) -> float:
    """Relative cost of analysing a tensor: flops of the Gram of its smaller side."""
    shape = _matrix_shape(entry)
    rows, cols = max(shape), min(shape)
    experts = entry.shape[0] if _layout(entry) == "experts" else 1
    return float(experts) * rows * cols * cols + cols**3


def linalg_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], int(math.prod(shape[1:])))


def _file_of(src: Source, entry: TensorEntry) -> Path | None:
    if isinstance(entry.locator, tuple) and entry.locator and isinstance(entry.locator[0], Path):
        return entry.locator[0]
    files = src.files()
    return files[0] if len(files) == 1 else None


def _cache_get(
    cache: SpectrumCache, digest: str, entry: TensorEntry, kappa_only: bool
) -> Payload | None:
    """Cached rows of ``entry`` whose content digest is ``digest``, if they fit the entry.

    Full rows serve every request; kappa-only rows serve only kappa-only requests."""
    layout = _layout(entry)
    matrices = _expected_matrices(entry)

    def check(rows: list[Any]) -> str | None:
        return rows_problem(rows, matrices)

    payload = cache.get(SpectrumCache.key(digest, layout), check)
    if payload is None and kappa_only:
        payload = cache.get(SpectrumCache.key(digest, layout, kappa_only=True), check)
    return payload


def _cache_put(
    cache: SpectrumCache, digest: str, layout: str, payload: list[dict[str, Any]]
) -> None:
    partial = any(p.get("kappa_only") for p in payload)
    cache.put(SpectrumCache.key(digest, layout, kappa_only=partial), payload)


def compute(
    the_plan: Plan,
    options: AnalyzeOptions,
    only: Sequence[TensorEntry] | None = None,
    progress: ProgressHook | None = None,
) -> Computed:
    """Digest and metric rows of each candidate (or of ``only``), through the cache."""
    src = the_plan.source
    todo = list(the_plan.candidates if only is None else only)
    device = options.torch_device()
    workers = options.worker_count(device)
    cache = SpectrumCache(options.cache_dir) if options.use_cache else None
    known: dict[str, str] = {}
    if cache is not None and not options.verify_cache:
        for f in src.files():
            known.update(cache.file_digests(f, the_plan.stats.get(f)))
    budget_bytes = options.memory_budget_mb * 1024 * 1024
    budget = _ByteBudget(budget_bytes)
    out: Computed = {}
    lock = threading.Lock()

    def lookup(digest: str, entry: TensorEntry) -> Payload | None:
        return None if cache is None else _cache_get(cache, digest, entry, options.kappa_only)

    def store(digest: str, layout: str, payload: Payload) -> None:
        if cache is not None and isinstance(payload, list):
            _cache_put(cache, digest, layout, payload)

    def work(entry: TensorEntry) -> None:
        layout = _layout(entry)
        payload: Payload | None = None
        digest = known.get(entry.name)
        if digest is not None:
            payload = lookup(digest, entry)
        if payload is None and _streamable(src, entry):
            assert isinstance(src, RowStreamingSource)
            n = entry.shape[1]
            rows = memory.block_rows(
                n, budget_bytes, options.block_rows, read=memory.itemsize(entry.dtype)
            )
            with budget.hold(memory.streamed_hold(n, rows, entry.dtype)):
                if digest is None:
                    digest = streamed_digest(src, entry, rows)
                    payload = lookup(digest, entry)
                if payload is None:
                    payload = _streamed_rows(src, entry, device, options, rows)
                    store(digest, layout, payload)
        elif payload is None:
            mat = _matrix_shape(entry)
            held = memory.tensor_bytes(entry.shape, entry.dtype)
            rows = memory.block_rows(min(mat), budget_bytes, options.block_rows, held=held)
            with budget.hold(memory.in_memory_hold(held, mat, rows)):
                t, fresh = src.read(entry)
                if fresh != digest:
                    payload = lookup(fresh, entry)
                digest = fresh
                if payload is None:
                    payload = _metric_rows(entry, t, device, options, rows)
                    store(digest, layout, payload)
                del t
        assert digest is not None and payload is not None
        with lock:
            out[entry.name] = (digest, payload)
            if progress is not None:
                progress(len(out), len(todo))

    if progress is not None:
        progress(0, len(todo))
    with _blas_single_thread(workers):
        if workers == 1:
            for e in todo:
                work(e)
        else:
            # largest first (LPT), so the workers finish together
            by_cost = sorted(todo, key=lambda e: (-matrix_cost(e), e.name))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(work, by_cost))
    return out


def assemble(the_plan: Plan, computed: Computed, options: AnalyzeOptions) -> Analysis:
    """Rows in checkpoint order; records the digests of unchanged files for the next run."""
    src = the_plan.source
    missing = [e.name for e in the_plan.candidates if e.name not in computed]
    if missing:
        raise RuntimeError(f"{len(missing)} tensors were not computed, e.g. {missing[0]}")
    if options.use_cache:
        cache = SpectrumCache(options.cache_dir)
        per_file: dict[Path, dict[str, str]] = {}
        for e in the_plan.candidates:
            f = _file_of(src, e)
            if f is not None:
                per_file.setdefault(f, {})[e.name] = computed[e.name][0]
        for f, d in per_file.items():
            cache.put_file_digests(f, d, the_plan.stats.get(f))
    rows: list[SpectrumRow] = []
    skipped = {s.name: s for s in the_plan.skipped}
    for e in the_plan.candidates:
        payload = computed[e.name][1]
        if isinstance(payload, str):
            skipped[e.name] = SkippedRow(e.name, e.shape, payload)
        else:
            rows.extend(_to_rows(e, payload))
    order = {e.name: i for i, e in enumerate(the_plan.entries)}
    digests = {name: d for name, (d, _) in computed.items()}
    return Analysis(
        source=src.description,
        fingerprint=_fingerprint(list(the_plan.entries), digests),
        tensors=tuple(rows),
        skipped=tuple(sorted(skipped.values(), key=lambda s: order[s.name])),
    )


def analyze(
    source: str | os.PathLike[str] | Source | torch.nn.Module | Mapping[str, torch.Tensor],
    options: AnalyzeOptions | None = None,
    progress: ProgressHook | None = None,
) -> Analysis:
    """Spectral metrics of every candidate weight matrix of ``source``.

    Candidates are floating-point tensors with ndim >= 2 that pass the filters; 3-D tensors
    whose name says they stack experts give one row per expert, other kernels are reshaped
    to (out, rest). Everything else is listed in ``skipped`` with its reason.
    Under ``torchrun``/``accelerate launch`` use ``kappatune.analysis.sharded.analyze_sharded``.
    """
    options = options or AnalyzeOptions()
    options.torch_device()  # fail fast on an unavailable device
    the_plan = plan(source, options)
    return assemble(the_plan, compute(the_plan, options, progress=progress), options)


def _fingerprint(entries: list[TensorEntry], digests: Mapping[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for e in sorted(entries, key=lambda x: x.name):
        h.update(f"{e.name}|{e.dtype}|{e.shape}|{digests.get(e.name, '')}\n".encode())
    return h.hexdigest()
