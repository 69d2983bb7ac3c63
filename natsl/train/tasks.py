"""Training tasks of `natsl train`: synthetic recall tasks generated on the fly, and real text from a local file.

Every task returns batches of `input_ids [B, T]` and `labels [B, T]` in the HF convention (`labels[t]` is the token
at `t`, predicted from position `t - 1`; `-100` is not scored), plus a `relevant [B, T]` mask of the tokens the
model has to remember (keys/values, needles, data to copy). Each synthetic task has an oracle, `solve(input_ids)`,
that reads the answers back from the sequence alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


@dataclass
class TaskBatch:
    """One batch of a task.

    Attributes:
        input_ids (torch.LongTensor): `[B, T]`.
        labels (torch.LongTensor): `[B, T]`, `-100` where not scored.
        relevant (torch.BoolTensor): `[B, T]`, the positions whose tokens must be remembered.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    relevant: torch.Tensor

    def to(self, device) -> TaskBatch:
        return TaskBatch(self.input_ids.to(device), self.labels.to(device), self.relevant.to(device))


class Task:
    """Base class: `sample(batch_size, generator)`; synthetic tasks also have `solve` and `describe`."""

    name = "task"
    vocab_size: int
    seq_len: int

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        raise NotImplementedError

    def solve(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Oracle: the labels (answers at scored positions, `-100` elsewhere) read from `input_ids [B, T]` alone."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _randperm_rows(B: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """`[B, n]`: an independent random permutation of `range(n)` per row."""
    return torch.rand(B, n, generator=generator).argsort(dim=1)


def _choose_slots(B: int, num_slots: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`[B, k]` distinct sorted slot indices in `range(num_slots)` per row."""
    return _randperm_rows(B, num_slots, generator)[:, :k].sort(dim=1).values


class MQARTask(Task):
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    The sequence holds `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (distinct keys), at its start
    (`kv_at="start"`) or after a filler prefix of random length (`kv_at="random"`); the rest is filler (token 0) in
    which `num_queries` keys reappear at random positions after the pairs, each followed by its value. Only those
    values are scored. Tokens: 0 = filler, keys in `[1, 1 + n_keys)`, values in `[1 + n_keys, vocab_size)`.

    Args:
        seq_len (int): `T`. Needs `T >= 2 * num_kv_pairs + 2 * num_queries`.
        num_kv_pairs (int): pairs to memorise.
        vocab_size (int): vocabulary (needs at least `num_kv_pairs` keys and 2 values).
        num_queries (int, Optional): queried keys (each key at most once). Default: `num_kv_pairs`.
        kv_at (str): `"start"` (Zoology) or `"random"`. Default: `"start"`.
    """

    name = "mqar"

    def __init__(self, seq_len: int, num_kv_pairs: int, vocab_size: int, num_queries: int | None = None,
                 kv_at: str = "start"):
        num_queries = num_kv_pairs if num_queries is None else num_queries
        if kv_at not in ("start", "random"):
            raise ValueError(f"kv_at must be 'start' or 'random', got {kv_at!r}")
        if num_kv_pairs < 1:
            raise ValueError(f"mqar needs num_kv_pairs >= 1, got {num_kv_pairs}")
        if not 1 <= num_queries <= num_kv_pairs:
            raise ValueError(f"mqar needs 1 <= num_queries <= num_kv_pairs={num_kv_pairs}, got {num_queries}")
        self.n_keys = (vocab_size - 1) // 2
        if self.n_keys < num_kv_pairs or vocab_size - 1 - self.n_keys < 2:
            raise ValueError(f"mqar with {num_kv_pairs} kv pairs needs vocab_size >= {max(2 * num_kv_pairs + 1, 4)} "
                             f"(filler + keys + values), got {vocab_size}")
        if seq_len < 2 * num_kv_pairs + 2 * num_queries:
            raise ValueError(f"mqar with {num_kv_pairs} kv pairs and {num_queries} queries needs seq_len >= "
                             f"{2 * num_kv_pairs + 2 * num_queries}, got {seq_len}")
        self.seq_len, self.num_kv_pairs, self.vocab_size, self.num_queries = seq_len, num_kv_pairs, vocab_size, \
            num_queries
        self.kv_at = kv_at

    def describe(self) -> str:
        where = "" if self.kv_at == "start" else " at random offsets"
        return (f"mqar: {self.num_kv_pairs} key-value pairs{where}, {self.num_queries} queries, seq_len "
                f"{self.seq_len}, vocab {self.vocab_size}")

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        B, T, n, q = batch_size, self.seq_len, self.num_kv_pairs, self.num_queries
        keys = 1 + _randperm_rows(B, self.n_keys, generator)[:, :n]
        values = 1 + self.n_keys + torch.randint(0, self.vocab_size - 1 - self.n_keys, (B, n), generator=generator)
        which = _randperm_rows(B, n, generator)[:, :q]  # the queried pairs, in random order
        # filler before the pairs (kv_at="random"); the queries go into pair slots of the room after them
        slack = T - 2 * n - 2 * q
        off = torch.zeros(B, 1, dtype=torch.long)
        if self.kv_at == "random":
            off = torch.randint(0, slack + 1, (B, 1), generator=generator)
        room = (T - off - 2 * n) // 2  # [B, 1] query slots after the pairs, >= q
        slots = (torch.rand(B, (T - 2 * n) // 2, generator=generator)
                 .masked_fill(torch.arange((T - 2 * n) // 2)[None] >= room, 2.0).argsort(1)[:, :q].sort(1).values)
        rows = torch.arange(B)[:, None]
        ids = torch.zeros(B, T, dtype=torch.long)
        kv = off + torch.arange(n)[None] * 2
        ids[rows, kv], ids[rows, kv + 1] = keys, values
        pos = off + 2 * n + 2 * slots  # [B, q] key positions of the queries
        ids[rows, pos], ids[rows, pos + 1] = keys.gather(1, which), values.gather(1, which)
        labels = torch.full_like(ids, IGNORE)
        labels[rows, pos + 1] = ids[rows, pos + 1]
        relevant = torch.zeros(B, T, dtype=torch.bool)
        relevant[rows, kv], relevant[rows, kv + 1] = True, True
        return TaskBatch(ids, labels, relevant)

    def solve(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.num_kv_pairs
        labels = torch.full_like(input_ids, IGNORE)
        for b, row in enumerate(input_ids.tolist()):
            start = next(t for t, x in enumerate(row) if x != 0)  # the pairs start at the first non-filler token
            table = dict(zip(row[start:start + 2 * n:2], row[start + 1:start + 2 * n:2]))
            for t in range(start + 2 * n, len(row) - 1):
                if 1 <= row[t] < 1 + self.n_keys:
                    labels[b, t + 1] = table[row[t]]
        return labels


class NeedleTask(Task):
    """Needle in a haystack: random haystack tokens hide `num_kv_pairs` needles `! key value`; the sequence ends
    with `num_queries` queries `? key value` about some of them. Only the queried values are scored.

    Tokens: 0 = `?` (query), 1 = `!` (needle), then keys, values and haystack tokens in three equal ranges.

    Args:
        seq_len (int): `T`. Needs room for the needles and queries: `T >= 3 * (num_kv_pairs + num_queries) + 1`.
        num_kv_pairs (int): needles (each query asks about a distinct one).
        vocab_size (int): vocabulary (at least `2 + 3 * num_kv_pairs`).
        num_queries (int): Default: `1`.
    """

    name = "needle"

    def __init__(self, seq_len: int, num_kv_pairs: int, vocab_size: int, num_queries: int = 1):
        if num_kv_pairs < 1 or not 1 <= num_queries <= num_kv_pairs:
            raise ValueError(f"needle needs num_kv_pairs >= 1 and 1 <= num_queries <= num_kv_pairs, got "
                             f"{num_kv_pairs} and {num_queries}")
        self.n_range = (vocab_size - 2) // 3
        if self.n_range < max(num_kv_pairs, 2):
            raise ValueError(f"needle with {num_kv_pairs} needles needs vocab_size >= {2 + 3 * max(num_kv_pairs, 2)}, "
                             f"got {vocab_size}")
        self.hay_len = seq_len - 3 * num_queries
        if self.hay_len // 3 < num_kv_pairs + 1:
            raise ValueError(f"needle with {num_kv_pairs} needles and {num_queries} queries needs seq_len >= "
                             f"{3 * (num_kv_pairs + 1 + num_queries)}, got {seq_len}")
        self.seq_len, self.num_kv_pairs, self.vocab_size, self.num_queries = seq_len, num_kv_pairs, vocab_size, \
            num_queries

    def describe(self) -> str:
        return (f"needle: {self.num_kv_pairs} needles in a haystack, {self.num_queries} queries, seq_len "
                f"{self.seq_len}, vocab {self.vocab_size}")

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        B, T, n, q, r = batch_size, self.seq_len, self.num_kv_pairs, self.num_queries, self.n_range
        key0, val0, hay0 = 2, 2 + r, 2 + 2 * r
        ids = hay0 + torch.randint(0, self.vocab_size - hay0, (B, T), generator=generator)
        keys = key0 + _randperm_rows(B, r, generator)[:, :n]
        values = val0 + torch.randint(0, r, (B, n), generator=generator)
        slots = _choose_slots(B, self.hay_len // 3, n, generator)
        pos = 3 * slots
        rows = torch.arange(B)[:, None]
        ids[rows, pos], ids[rows, pos + 1], ids[rows, pos + 2] = 1, keys, values
        which = _randperm_rows(B, n, generator)[:, :q]
        qpos = self.hay_len + 3 * torch.arange(q)[None].expand(B, q)
        ids[rows, qpos], ids[rows, qpos + 1], ids[rows, qpos + 2] = 0, keys.gather(1, which), values.gather(1, which)
        labels = torch.full_like(ids, IGNORE)
        labels[rows, qpos + 2] = ids[rows, qpos + 2]
        relevant = torch.zeros(B, T, dtype=torch.bool)
        for j in range(3):
            relevant[rows, pos + j] = True
        return TaskBatch(ids, labels, relevant)

    def solve(self, input_ids: torch.Tensor) -> torch.Tensor:
        labels = torch.full_like(input_ids, IGNORE)
        for b, row in enumerate(input_ids.tolist()):
            table = {row[t + 1]: row[t + 2] for t in range(len(row) - 2) if row[t] == 1}
            for t in range(len(row) - 2):
                if row[t] == 0:
                    labels[b, t + 2] = table[row[t + 1]]
        return labels


class SelectiveCopyTask(Task):
    """Selective copying (Mamba, Gu & Dao 2023): `num_kv_pairs` data tokens scattered among blanks (token 0), then a
    separator (token 1), then the data tokens again in order. The copies are scored.

    Args:
        seq_len (int): `T >= 2 * num_kv_pairs + 1`.
        num_kv_pairs (int): data tokens to copy.
        vocab_size (int): data tokens are drawn from `[2, vocab_size)` (at least 3).
    """

    name = "copy"

    def __init__(self, seq_len: int, num_kv_pairs: int, vocab_size: int):
        if num_kv_pairs < 1:
            raise ValueError(f"copy needs num_kv_pairs (tokens to copy) >= 1, got {num_kv_pairs}")
        if vocab_size < 3:
            raise ValueError(f"copy needs vocab_size >= 3 (blank, separator, data), got {vocab_size}")
        if seq_len < 2 * num_kv_pairs + 1:
            raise ValueError(f"copy of {num_kv_pairs} tokens needs seq_len >= {2 * num_kv_pairs + 1}, got {seq_len}")
        self.seq_len, self.num_kv_pairs, self.vocab_size = seq_len, num_kv_pairs, vocab_size
        self.prefix_len = seq_len - num_kv_pairs - 1

    def describe(self) -> str:
        return (f"copy: {self.num_kv_pairs} tokens scattered in {self.prefix_len} blanks, seq_len {self.seq_len}, "
                f"vocab {self.vocab_size}")

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        B, n, L = batch_size, self.num_kv_pairs, self.prefix_len
        data = 2 + torch.randint(0, self.vocab_size - 2, (B, n), generator=generator)
        pos = _choose_slots(B, L, n, generator)
        ids = torch.zeros(B, self.seq_len, dtype=torch.long)
        rows = torch.arange(B)[:, None]
        ids[rows, pos] = data
        ids[:, L] = 1
        ids[:, L + 1:] = data
        labels = torch.full_like(ids, IGNORE)
        labels[:, L + 1:] = data
        relevant = torch.zeros(B, self.seq_len, dtype=torch.bool)
        relevant[rows, pos] = True
        return TaskBatch(ids, labels, relevant)

    def solve(self, input_ids: torch.Tensor) -> torch.Tensor:
        labels = torch.full_like(input_ids, IGNORE)
        for b, row in enumerate(input_ids.tolist()):
            sep = row.index(1)
            data = [x for x in row[:sep] if x != 0]
            labels[b, sep + 1:sep + 1 + len(data)] = torch.tensor(data[:len(row) - sep - 1], dtype=torch.long)
        return labels


class TextTask(Task):
    """Next-token prediction on a local text file (`.txt`: the whole file; `.jsonl`: the `"text"` field of every
    line, or its first string field), on an installed HF dataset (`hf:NAME[:CONFIG]`, offline), or on `stdlib`:
    the Python standard library's own sources (:func:`stdlib_texts`, on every machine, no download).

    Tokenised with `tokenizer` (a locally installed HF tokenizer: name or path, loaded with `local_files_only=True`)
    or, without one, as UTF-8 bytes (vocab 256). The last `eval_fraction` of the tokens is held out for evaluation.

    Args:
        source (str): file path, `hf:NAME[:CONFIG]` or `stdlib`.
        seq_len (int): window length `T`.
        tokenizer (str, Optional): HF tokenizer name/path. Default: `None` (bytes).
        eval_fraction (float): held-out share of the token stream. Default: `0.1`.
    """

    name = "text"

    def __init__(self, source: str, seq_len: int, tokenizer: str | None = None, eval_fraction: float = 0.1):
        texts = _read_texts(source)
        if tokenizer is None:
            ids = torch.frombuffer(bytearray("\n".join(texts).encode("utf-8")), dtype=torch.uint8).long()
            self.vocab_size = 256
        else:
            tok = _load_tokenizer(tokenizer)
            ids = []
            for text in texts:
                ids.extend(tok(text, add_special_tokens=False)["input_ids"])
                if tok.eos_token_id is not None:
                    ids.append(tok.eos_token_id)
            self.vocab_size = len(tok)
        stream = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
        n_eval = max(seq_len + 1, int(len(stream) * eval_fraction))
        if len(stream) < n_eval + seq_len + 1:
            raise ValueError(f"{source} has {len(stream)} tokens, too few for seq_len {seq_len} plus a held-out "
                             f"split of {n_eval} tokens; use a longer text or a shorter --seq-len")
        self.train_stream, self.eval_stream = stream[:-n_eval], stream[-n_eval:]
        self.seq_len, self.source, self.tokenizer = seq_len, source, tokenizer

    def describe(self) -> str:
        return (f"text: {self.source} ({len(self.train_stream)} train / {len(self.eval_stream)} held-out tokens, "
                f"{'bytes' if self.tokenizer is None else self.tokenizer}), seq_len {self.seq_len}")

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        stream = self.train_stream if split == "train" else self.eval_stream
        start = torch.randint(0, len(stream) - self.seq_len + 1, (batch_size,), generator=generator)
        ids = stream[start[:, None] + torch.arange(self.seq_len)[None]]
        return TaskBatch(ids, ids.clone(), torch.zeros_like(ids, dtype=torch.bool))


STDLIB_SOURCE = "stdlib"
STDLIB_MAX_BYTES = 16 * 2**20
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_texts(max_bytes: int = STDLIB_MAX_BYTES) -> list[str]:
    """A real-text corpus every machine has, built without the network: the `.py` files (code, comments and
    docstrings) of the running Python's standard library (`sysconfig`'s `stdlib` path; test suites and installed
    packages skipped), one document per file in sorted path order, up to `max_bytes` of UTF-8 in all. The corpus
    depends on the Python version (3.11 and 3.12 differ)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text.encode("utf-8"))
        if total > max_bytes:
            break
        texts.append(text)
    if not texts:
        raise ValueError(f"no Python sources found under the standard library path {root}")
    return texts


def _read_texts(source: str) -> list[str]:
    if source == STDLIB_SOURCE:
        return stdlib_texts()
    if source.startswith("hf:"):
        return _read_hf_dataset(source[3:])
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"text data file not found: {source}")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{i + 1}: not valid JSON ({e.msg})") from None
            text = rec.get("text") if isinstance(rec, dict) else None
            if text is None and isinstance(rec, dict):
                text = next((v for v in rec.values() if isinstance(v, str)), None)
            if not isinstance(text, str):
                raise ValueError(f"{source}:{i + 1}: no \"text\" (or other string) field")
            texts.append(text)
        return texts
    return [path.read_text(encoding="utf-8", errors="replace")]


def _read_hf_dataset(spec: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: data needs the `datasets` package (pip install datasets) and the dataset already in "
                         "the local HF cache") from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", download_mode="reuse_cache_if_exists")
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "not available offline"
        raise ValueError(f"cannot load HF dataset {name!r} from the local cache (no network at run time): {e}") from None
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise ValueError(f"HF dataset {name!r} has no text column")
    return list(ds[column])


def _load_tokenizer(name: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the tokenizer is not installed locally
        raise ValueError(f"tokenizer {name!r} is not available locally (no network at run time; pass a local "
                         f"directory or a name in the HF cache, or omit --tokenizer for byte-level tokens): "
                         f"{type(e).__name__}: {e}") from None


SYNTHETIC_TASKS = {"mqar": MQARTask, "needle": NeedleTask, "copy": SelectiveCopyTask}
TASKS = (*SYNTHETIC_TASKS, "text")


def make_task(name: str, *, seq_len: int, num_kv_pairs: int | None = None, vocab_size: int | None = None,
              num_queries: int | None = None, kv_at: str = "start", data: str | None = None,
              tokenizer: str | None = None) -> Task:
    """Build a task by name (`mqar`, `needle`, `copy`, `text`); raises `ValueError` with the reason on bad knobs."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if name == "text":
        if data is None:
            raise ValueError("task text needs --data PATH (.txt or .jsonl) or --data hf:NAME")
        given = [flag for flag, v in (("--num-kv-pairs", num_kv_pairs), ("--vocab", vocab_size),
                                      ("--num-queries", num_queries)) if v is not None]
        if kv_at != "start":
            given.append("--kv-at")
        if given:
            raise ValueError(f"{', '.join(given)} do(es) not apply to --task text (its vocabulary is the tokenizer's)")
        return TextTask(data, seq_len, tokenizer)
    if data is not None or tokenizer is not None:
        raise ValueError(f"--data/--tokenizer only apply to --task text, not {name}")
    defaults = {"mqar": (8, 64), "needle": (4, 64), "copy": (16, 32)}[name]
    n = defaults[0] if num_kv_pairs is None else num_kv_pairs
    v = defaults[1] if vocab_size is None else vocab_size
    if kv_at != "start" and name != "mqar":
        raise ValueError(f"--kv-at only applies to --task mqar, not {name}")
    if name == "mqar":
        return MQARTask(seq_len, n, v, num_queries, kv_at)
    if name == "needle":
        return NeedleTask(seq_len, n, v, 1 if num_queries is None else num_queries)
    if num_queries is not None:
        raise ValueError("--num-queries does not apply to task copy")
    return SelectiveCopyTask(seq_len, n, v)
