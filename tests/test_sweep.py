"""emovec sweep: readings over datasets into Parquet shards, checked against the monitor run on each example alone;
formats, chat roles, overflow, bad input, the settings guard and resumption. The kill-and-resume and 2-process
tests run the default model in subprocesses (slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import emovec
from emovec.sweep import SweepError, SweepResult, run_sweep
from emovec.sweep.inputs import read_examples
from test_cli_runtime import invoke, one_line_error, slow

TEXTS = ["The storm tore the roof off.", "I finally passed my driving test today!", "Quiet morning, tea and rain.",
         "Someone is knocking at the door at 3am.", "We lost the final in the last minute.",
         "My grandmother sent me a letter with pressed flowers inside.", "ok"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _alone(model, tokenizer, vectors, text: str, layer: int, *, chat_messages=None) -> torch.Tensor:
    """(T, K) cosines of one example read on its own by the monitor (full forward pass, no batching)."""
    if chat_messages is not None:
        text = tokenizer.apply_chat_template(chat_messages, tokenize=False, add_generation_prompt=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad(), emovec.monitor(model, vectors, [layer], tokenizer=tokenizer) as mon:
        model(**ids)
    return mon.result(decode=False).cosine[0, :, 0]


@pytest.mark.parametrize("pool", ["token", "mean", "last", "max"])
def test_readings_equal_the_monitor_on_each_example_alone(tiny_chat_model, tmp_path, pool):
    model, tokenizer, vectors = tiny_chat_model
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    manifest = run_sweep(model, tokenizer, vectors, data, tmp_path / "out", layers=[1, 2], pool=pool,
                         dtype="float32", chunk_size=3, batch_tokens=40, progress=False)
    assert manifest["totals"]["examples"] == len(TEXTS) and len(manifest["shards"]) == 3
    result = SweepResult.open(tmp_path / "out")
    table = result.table().to_pandas()
    for e, text in enumerate(TEXTS):
        for layer in (1, 2):
            want = _alone(model, tokenizer, vectors, text, layer)
            rows = table[table.example == e]
            got = torch.tensor(rows[[f"{n}@L{layer}" for n in vectors.names]].to_numpy())
            if pool == "token":
                assert rows.token.tolist() == list(range(len(want)))
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            else:
                pooled = {"mean": want.mean(0), "last": want[-1], "max": want.max(0).values}[pool]
                torch.testing.assert_close(got[0], pooled, rtol=1e-4, atol=1e-4)


def test_selection_by_example_layer_and_vector_and_float16(tiny_chat_model, tmp_path):
    model, tokenizer, vectors = tiny_chat_model
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    run_sweep(model, tokenizer, vectors, data, tmp_path / "f16", layers="all", pool="token", progress=False)
    run_sweep(model, tokenizer, vectors, data, tmp_path / "f32", layers="all", pool="token", dtype="float32",
              progress=False)
    half = SweepResult.open(tmp_path / "f16").table(examples=[1, 3], layers=[2], vectors=["calm", "afraid"])
    full = SweepResult.open(tmp_path / "f32").table(examples=[1, 3], layers=[2], vectors=["calm", "afraid"])
    assert half.column_names[-2:] == ["calm@L2", "afraid@L2"] and set(half.column("example").to_pylist()) == {1, 3}
    a, b = (torch.tensor(t.column("calm@L2").to_numpy()) for t in (half, full))
    assert (a - b).abs().max() <= 2.5e-4  # float16 keeps cosines to about 2.4e-4 (11-bit mantissa)
    with pytest.raises(SweepError, match="layer 7 was not recorded"):
        SweepResult.open(tmp_path / "f16").table(layers=[7])
    with pytest.raises(SweepError, match="vector 'joy' was not recorded"):
        SweepResult.open(tmp_path / "f16").table(vectors=["joy"])
    import pandas as pd  # the shards open without emovec

    frame = pd.read_parquet(tmp_path / "f16" / "shards")
    assert len(frame) == sum(frame.groupby("example").size()) and "L0" in frame.columns


def test_formats_give_the_same_rows(tiny_chat_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, tokenizer, vectors = tiny_chat_model
    _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([[i, t] for i, t in enumerate(TEXTS)])
    (tmp_path / "d.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "d.parquet")
    tables = {}
    for name in ("d.jsonl", "d.csv", "d.txt", "d.parquet"):
        run_sweep(model, tokenizer, vectors, tmp_path / name, tmp_path / f"out-{name}", pool="mean", progress=False)
        tables[name] = SweepResult.open(tmp_path / f"out-{name}").table()
    for name, table in tables.items():
        assert table.equals(tables["d.jsonl"]), name


def test_chat_rows_know_their_message_and_role_and_the_assistant_pool(tiny_chat_model, tmp_path):
    model, tokenizer, vectors = tiny_chat_model
    conversations = [[{"role": "user", "content": "My cat is missing."},
                      {"role": "assistant", "content": "I'm sorry. Have you checked the garden?"},
                      {"role": "user", "content": "Yes, twice."},
                      {"role": "assistant", "content": "Then call the neighbours."}]]
    data = _jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in conversations])
    run_sweep(model, tokenizer, vectors, data, tmp_path / "tok", pool="token", chat=True, dtype="float32",
              progress=False)
    table = SweepResult.open(tmp_path / "tok").table().to_pandas()
    text = tokenizer.apply_chat_template(conversations[0], tokenize=False)
    for i, message in enumerate(conversations[0]):
        rows = table[table.message == i]
        assert set(rows.role) == {message["role"]}
        content = "".join(text[s:e] for s, e in zip(rows.char_start, rows.char_end))
        assert message["content"] in content
    run_sweep(model, tokenizer, vectors, data, tmp_path / "asst", pool="assistant", chat=True, progress=False)
    turns = SweepResult.open(tmp_path / "asst").table().to_pandas()
    assert turns.turn.tolist() == [1, 3]
    want = _alone(model, tokenizer, vectors, "", 1, chat_messages=conversations[0])
    for _, row in turns.iterrows():
        got = torch.tensor([row[f"{n}@L1"] for n in vectors.names], dtype=torch.float32)
        torch.testing.assert_close(got, want[int(row.token)], rtol=1e-4, atol=1e-4)
        assert table[(table.token == row.token + 1)].message.iloc[0] == row.turn  # the next token is the turn's own


def test_long_examples_are_truncated_or_split_and_counted(tiny_chat_model, tmp_path):
    model, tokenizer, vectors = tiny_chat_model
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    cut = run_sweep(model, tokenizer, vectors, data, tmp_path / "cut", pool="token", max_length=6, progress=False)
    assert cut["totals"]["truncated"] == sum(n > 6 for n in lengths) and cut["totals"]["tokens"] == sum(
        min(n, 6) for n in lengths)
    split = run_sweep(model, tokenizer, vectors, data, tmp_path / "split", pool="mean", max_length=6,
                      overflow="split", dtype="float32", progress=False)
    assert split["totals"]["split"] == sum(n > 6 for n in lengths) and split["totals"]["tokens"] == sum(lengths)
    table = SweepResult.open(tmp_path / "split").table().to_pandas()
    e = max(range(len(TEXTS)), key=lambda i: lengths[i])
    ids = tokenizer(TEXTS[e])["input_ids"]
    windows = []
    for start in range(0, len(ids), 6):  # each window read alone, as the sweep reads it
        with torch.no_grad(), emovec.monitor(model, vectors, [1]) as mon:
            model(input_ids=torch.tensor([ids[start:start + 6]]))
        windows.append(mon.result(decode=False).cosine[0, :, 0])
    want = torch.cat(windows).mean(0)
    got = torch.tensor(table[table.example == e][[f"{n}@L1" for n in vectors.names]].to_numpy()[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_rows_stop_with_their_line_or_are_skipped_and_counted(tiny_chat_model, tmp_path):
    model, tokenizer, vectors = tiny_chat_model
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": \n["list"]\n{"text": ""}\n{"text": "caf\xe9"}\n{"txt": "x"}\n'
                     b'{"text": "also fine"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl, line 2: not valid JSON"):
        run_sweep(model, tokenizer, vectors, path, tmp_path / "stop", progress=False)
    manifest = run_sweep(model, tokenizer, vectors, path, tmp_path / "skip", on_error="skip", progress=False)
    assert manifest["totals"]["examples"] == 2 and manifest["totals"]["skipped_rows"] == 5
    assert any("line 5: not valid UTF-8" in p for p in manifest["skipped"])
    assert [e.text for e in read_examples(path, on_error="skip")] == ["fine", "also fine"]


def test_other_settings_into_the_same_folder_are_refused_and_reruns_reuse_the_result(tiny_chat_model, tmp_path):
    model, tokenizer, vectors = tiny_chat_model
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    first = run_sweep(model, tokenizer, vectors, data, tmp_path / "o", pool="mean", chunk_size=2, progress=False)
    with pytest.raises(SweepError, match="other settings \\(different pool\\)"):
        run_sweep(model, tokenizer, vectors, data, tmp_path / "o", pool="max", chunk_size=2, progress=False)
    # an interrupted run: a shard and the manifest gone; the rerun rebuilds exactly what was there
    shard = tmp_path / "o" / first["shards"][1]["file"]
    before = shard.read_bytes()
    shard.unlink()
    (tmp_path / "o" / "manifest.json").unlink()
    again = run_sweep(model, tokenizer, vectors, data, tmp_path / "o", pool="mean", chunk_size=2, progress=False)
    assert shard.read_bytes() == before and again["totals"] == first["totals"]


def test_sweep_command_bad_input(tiny_chat_model, tmp_path, monkeypatch):
    from emovec import cli
    from emovec.models import LoadedModel

    model, tokenizer, vectors = tiny_chat_model
    monkeypatch.setitem(cli._MODELS, ("tiny", None), LoadedModel(model, tokenizer, "tiny"))
    vfile = vectors.save(tmp_path / "v.safetensors")
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    ok = invoke("sweep", str(data), "--out", str(tmp_path / "o"), "--model", "tiny", "--vectors", str(vfile),
                "--quiet")
    assert ok.exit_code == 0, ok.output
    assert "7 examples" in ok.output
    line = one_line_error(invoke("sweep", str(data), "--out", str(tmp_path / "o"), "--model", "tiny", "--vectors",
                                 str(vfile), "--pool", "max", "--quiet"))
    assert "other settings" in line
    line = one_line_error(invoke("sweep", str(data), "--out", str(tmp_path / "a"), "--model", "tiny", "--vectors",
                                 str(vfile), "--pool", "assistant", "--quiet"))
    assert "needs chat input" in line
    other = emovec.VectorSet.from_tensor(torch.randn(2, 48), ["a", "b"]).save(tmp_path / "w.safetensors")
    line = one_line_error(invoke("sweep", str(data), "--out", str(tmp_path / "b"), "--model", "tiny", "--vectors",
                                 str(other), "--quiet"))
    assert "hidden size 48" in line and not (tmp_path / "b").exists()  # refused before any work


# ------------------------------------------------------------------------- the default model, in subprocesses

SWEEP_TEXTS = [f"Example {i}: " + t for i in range(4) for t in TEXTS]


def _sweep_command(data, out, *extra):
    return [sys.executable, "-m", "emovec", "sweep", str(data), "--out", str(out), "--layers", "10,19",
            "--names", "afraid,calm,happy,sad", "--pool", "token", "--chunk-size", "4", "--threads", "1",
            "--quiet", *extra]


@slow
def test_two_processes_give_the_same_result_as_one(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in SWEEP_TEXTS])
    subprocess.run(_sweep_command(data, tmp_path / "one"), check=True, capture_output=True, timeout=600)
    two = subprocess.run(_sweep_command(data, tmp_path / "two", "--nproc", "2"), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one_table, two_table = (SweepResult.open(tmp_path / x).table() for x in ("one", "two"))
    assert one_table.equals(two_table)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2


@slow
def test_killed_sweep_resumes_to_the_same_result(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in SWEEP_TEXTS])
    subprocess.run(_sweep_command(data, tmp_path / "whole"), check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(_sweep_command(data, tmp_path / "killed"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("*.parquet")) if shards.exists() else []) < 2:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    subprocess.run(_sweep_command(data, tmp_path / "killed"), check=True, capture_output=True, timeout=600)
    assert SweepResult.open(tmp_path / "killed").table().equals(SweepResult.open(tmp_path / "whole").table())
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    killed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert killed["totals"] == whole["totals"] and len(killed["shards"]) == len(whole["shards"]) == 7


def test_a_datasets_save_to_disk_folder_reads_like_jsonl(tiny_chat_model, tmp_path):
    datasets = pytest.importorskip("datasets")
    model, tokenizer, vectors = tiny_chat_model
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    run_sweep(model, tokenizer, vectors, tmp_path / "ds", tmp_path / "a", progress=False)
    run_sweep(model, tokenizer, vectors, tmp_path / "d.jsonl", tmp_path / "b", progress=False)
    assert SweepResult.open(tmp_path / "a").table().equals(SweepResult.open(tmp_path / "b").table())
