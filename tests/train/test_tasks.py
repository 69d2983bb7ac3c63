"""The tasks of `natsl train`: every synthetic task is solved exactly by an oracle that reads only the sequence,
labels are masked everywhere but the answers, and the knobs are validated; plus the loop's small pure helpers."""

import json

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from natsl.train.loop import lr_factor, make_eval_set, param_groups, token_accuracy, train_batch_generator
from natsl.train.tasks import IGNORE, MQARTask, NeedleTask, SelectiveCopyTask, TextTask, make_task


def _check_batch(task, batch, B):
    ids, labels, rel = batch.input_ids, batch.labels, batch.relevant
    assert ids.shape == labels.shape == rel.shape == (B, task.seq_len)
    assert ids.dtype == labels.dtype == torch.long and rel.dtype == torch.bool
    assert int(ids.min()) >= 0 and int(ids.max()) < task.vocab_size
    scored = labels != IGNORE
    assert not scored[:, 0].any(), "position 0 has no previous token to predict it from"
    # HF convention: a scored label is the token at its own position
    assert torch.equal(labels[scored], ids[scored])
    # the oracle reads every answer back from the sequence alone, and scores exactly the same positions
    assert torch.equal(task.solve(ids), labels)
    return scored


@st.composite
def mqar_knobs(draw):
    n = draw(st.integers(1, 24))
    q = draw(st.integers(1, n))
    T = draw(st.integers(2 * n + 2 * q, 2 * n + 2 * q + 80))
    V = draw(st.integers(max(2 * n + 1, 4), 2 * n + 64))
    return T, n, V, q, draw(st.sampled_from(["start", "random"])), draw(st.integers(0, 2**31 - 1)), \
        draw(st.integers(1, 6))


@given(mqar_knobs())
@example((4, 1, 4, 1, "start", 0, 1))  # the smallest MQAR: one pair, one query, no filler, two values
@example((4, 1, 4, 1, "random", 0, 1))
@example((256, 16, 128, 16, "start", 1, 4))
@example((256, 16, 128, 4, "random", 1, 4))
def test_mqar_oracle_and_masks(knobs):
    T, n, V, q, kv_at, seed, B = knobs
    task = MQARTask(T, n, V, q, kv_at)
    batch = task.sample(B, torch.Generator().manual_seed(seed))
    scored = _check_batch(task, batch, B)
    ids, rel = batch.input_ids, batch.relevant
    assert (scored.sum(1) == q).all()
    assert (rel.sum(1) == 2 * n).all()
    start = rel.float().argmax(1)
    if kv_at == "start":
        assert (start == 0).all()
    for b in range(B):
        s = int(start[b])
        assert rel[b, s:s + 2 * n].all(), "the pairs are contiguous"
        assert (ids[b, :s] == 0).all(), "only filler before the pairs"
        keys, values = ids[b, s:s + 2 * n:2], ids[b, s + 1:s + 2 * n:2]
        assert ((keys >= 1) & (keys < 1 + task.n_keys)).all() and len(set(keys.tolist())) == n
        assert (values >= 1 + task.n_keys).all(), "values come from the value range"
        # after the pairs: only queries (a key, then its scored value) and filler
        after = scored[b].nonzero().flatten()
        assert (after > s + 2 * n).all()
        rest = ids[b, s + 2 * n:].clone()
        rest[after - s - 2 * n] = 0
        rest[after - 1 - s - 2 * n] = 0
        assert (rest == 0).all()


def test_mqar_random_offsets_vary():
    task = MQARTask(128, 8, 64, kv_at="random")
    rel = task.sample(64, torch.Generator().manual_seed(0)).relevant
    starts = rel.float().argmax(1)
    assert len(set(starts.tolist())) > 10 and int(starts.max()) > 32


@st.composite
def needle_knobs(draw):
    n = draw(st.integers(1, 10))
    q = draw(st.integers(1, n))
    T = draw(st.integers(3 * (n + 1 + q), 3 * (n + 1 + q) + 100))
    V = draw(st.integers(2 + 3 * max(n, 2), 2 + 3 * max(n, 2) + 60))
    return T, n, V, q, draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 6))


@given(needle_knobs())
@example((12, 1, 8, 1, 0, 2))
def test_needle_oracle_and_masks(knobs):
    T, n, V, q, seed, B = knobs
    task = NeedleTask(T, n, V, q)
    batch = task.sample(B, torch.Generator().manual_seed(seed))
    scored = _check_batch(task, batch, B)
    ids = batch.input_ids
    assert (scored.sum(1) == q).all()
    assert ((ids == 1).sum(1) == n).all() and ((ids == 0).sum(1) == q).all()
    assert (batch.relevant.sum(1) == 3 * n).all()
    assert (ids[batch.relevant].view(B, n, 3)[..., 0] == 1).all(), "each needle is `! key value`"
    assert scored[:, -1].all(), "the last token is the answer of the last query"


@st.composite
def copy_knobs(draw):
    n = draw(st.integers(1, 32))
    T = draw(st.integers(2 * n + 1, 2 * n + 120))
    V = draw(st.integers(3, 80))
    return T, n, V, draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 6))


@given(copy_knobs())
@example((3, 1, 3, 0, 1))
def test_copy_oracle_and_masks(knobs):
    T, n, V, seed, B = knobs
    task = SelectiveCopyTask(T, n, V)
    batch = task.sample(B, torch.Generator().manual_seed(seed))
    scored = _check_batch(task, batch, B)
    ids = batch.input_ids
    assert (scored.sum(1) == n).all() and scored[:, -n:].all()
    assert ((ids == 1).sum(1) == 1).all() and (ids[:, T - n - 1] == 1).all()
    assert (batch.relevant.sum(1) == n).all()
    assert torch.equal(ids[batch.relevant].view(B, n), ids[:, -n:]), "the copy is the data in order"


@pytest.mark.parametrize("name", ["mqar", "needle", "copy"])
def test_sampling_is_a_function_of_the_generator(name):
    task = make_task(name, seq_len=64, num_kv_pairs=4, vocab_size=40)
    a = task.sample(4, torch.Generator().manual_seed(3))
    b = task.sample(4, torch.Generator().manual_seed(3))
    c = task.sample(4, torch.Generator().manual_seed(4))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)
    # train batches are a pure function of (seed, step, rank), so a resumed run replays the same data
    g1, g2 = train_batch_generator(0, 7, 0), train_batch_generator(0, 7, 0)
    assert torch.equal(task.sample(2, g1).input_ids, task.sample(2, g2).input_ids)
    assert not torch.equal(task.sample(2, train_batch_generator(0, 7, 0)).input_ids,
                           task.sample(2, train_batch_generator(0, 7, 1)).input_ids)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mqar", seq_len=30, num_kv_pairs=8, vocab_size=64), "seq_len >= 32"),
    (dict(name="mqar", seq_len=64, num_kv_pairs=8, vocab_size=16), "vocab_size >= 17"),
    (dict(name="mqar", seq_len=64, num_kv_pairs=4, vocab_size=64, num_queries=5), "num_queries"),
    (dict(name="needle", seq_len=17, num_kv_pairs=4, vocab_size=64), "seq_len >= 18"),
    (dict(name="needle", seq_len=64, num_kv_pairs=4, vocab_size=10), "vocab_size >= 14"),
    (dict(name="copy", seq_len=10, num_kv_pairs=8, vocab_size=64), "seq_len >= 17"),
    (dict(name="copy", seq_len=64, num_kv_pairs=4, vocab_size=2), "vocab_size >= 3"),
    (dict(name="copy", seq_len=64, num_kv_pairs=4, vocab_size=8, num_queries=2), "num-queries"),
    (dict(name="sort", seq_len=64), "unknown task"),
    (dict(name="copy", seq_len=64, kv_at="random"), "only applies to --task mqar"),
    (dict(name="mqar", seq_len=64, kv_at="middle"), "kv_at must be"),
    (dict(name="text", seq_len=64), "--data"),
    (dict(name="text", seq_len=64, data="x.txt", vocab_size=64), r"--vocab do\(es\) not apply to --task text"),
    (dict(name="mqar", seq_len=64, data="x.txt"), "only apply to --task text"),
], ids=["mqar-short", "mqar-vocab", "mqar-queries", "needle-short", "needle-vocab", "copy-short", "copy-vocab",
        "copy-queries", "unknown", "kv-at-copy", "kv-at-bad", "text-no-data", "text-vocab", "data-not-text"])
def test_bad_task_knobs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task(kwargs.pop("name"), **kwargs)


def test_text_task_bytes_txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    task = make_task("text", seq_len=32, data=str(path))
    assert task.vocab_size == 256
    batch = task.sample(3, torch.Generator().manual_seed(0))
    assert torch.equal(batch.input_ids, batch.labels) and not batch.relevant.any()
    text = bytes(batch.input_ids[0].tolist()).decode()
    assert text in path.read_text() * 2
    held = task.sample(2, torch.Generator().manual_seed(0), split="eval").input_ids
    assert bytes(held[0].tolist()).decode() in path.read_text()[-len(task.eval_stream):]
    assert len(task.train_stream) + len(task.eval_stream) == len(path.read_bytes())


def test_text_task_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": f"document number {i} " * 5}) for i in range(30)))
    task = make_task("text", seq_len=16, data=str(path))
    assert task.sample(2, torch.Generator().manual_seed(0)).input_ids.shape == (2, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        make_task("text", seq_len=16, data=str(bad))


def test_text_task_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        make_task("text", seq_len=16, data=str(tmp_path / "missing.txt"))
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    with pytest.raises(ValueError, match="too few"):
        make_task("text", seq_len=16, data=str(small))
    with pytest.raises(ValueError, match="not available locally"):
        TextTask(str(small), 2, tokenizer=str(tmp_path / "no-such-tokenizer"))


def test_token_accuracy_counts_only_scored_positions():
    task = make_task("mqar", seq_len=40, num_kv_pairs=5, vocab_size=32)
    batch = task.sample(3, torch.Generator().manual_seed(1))
    # logits of a perfect model: at t, the label of t + 1
    target = batch.labels[:, 1:].clamp(min=0)
    logits = torch.nn.functional.one_hot(torch.cat([target, target[:, :1]], 1), task.vocab_size).float()
    assert token_accuracy(logits, batch.labels) == (15, 15, 3, 3)
    logits[0, :] = 0  # every prediction of row 0 becomes token 0, never a value
    assert token_accuracy(logits, batch.labels) == (10, 15, 2, 3)


def test_eval_set_size_and_split():
    task = make_task("copy", seq_len=24, num_kv_pairs=4, vocab_size=16)
    batches = make_eval_set(task, 10, 4, seed=0)
    assert [b.input_ids.shape[0] for b in batches] == [4, 4, 2]
    again = make_eval_set(task, 10, 4, seed=0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again))


def test_lr_schedule_and_weight_decay_groups():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])), "cosine decays monotonically"
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    marked = torch.nn.Parameter(torch.ones(3, 3))
    marked._no_weight_decay = True
    model.register_parameter("marked", marked)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert len(no_decay["params"]) == 4  # bias, LayerNorm weight and bias, the marked matrix


def test_text_task_with_a_local_hf_tokenizer(tmp_path):
    """A tokenizer saved in a local folder (built here with `tokenizers`, no download) is loaded offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["natsl", "routes", "every", "block", "of", "tokens", "to", "softmax", "or", "to", "a", "linear", "state"]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(tmp_path / "tok")
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(words)}) for _ in range(20)))
    task = make_task("text", seq_len=8, data=str(data), tokenizer=str(tmp_path / "tok"))
    assert task.vocab_size == len(vocab)
    stream = torch.cat([task.train_stream, task.eval_stream]).tolist()
    assert stream[:len(words) + 1] == [vocab[w] for w in words] + [1]  # each document ends with EOS
    assert 0 not in stream


def test_text_task_on_the_standard_library():
    """`--data stdlib`: a real-text corpus built from the running Python's own sources, without the network."""
    from natsl.train.tasks import stdlib_texts

    texts = stdlib_texts(max_bytes=2**20)
    assert len(texts) > 5 and sum(len(t.encode()) for t in texts) <= 2**20
    assert any("def " in t for t in texts)
    task = TextTask("stdlib", seq_len=64)
    assert task.vocab_size == 256 and len(task.train_stream) > 5 * len(task.eval_stream) > 0
    batch = task.sample(4, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == (4, 64) and int(batch.input_ids.max()) < 256
    again = TextTask("stdlib", seq_len=64)
    assert torch.equal(again.train_stream, task.train_stream)  # deterministic
